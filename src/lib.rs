//! eoss: declarative, content-cached pipelines that reproduce the experiments of
//! *Edge of Stochastic Stability: Revisiting the Edge of Stability for SGD*.
//!
//! Layers, with dependencies pointing one way:
//! `cli → exec → {spec, expand, graph, key, store, report, stages} → {train, curvature, analysis, plot}
//! → {nn, data}`. `nn`, `data`, `curvature`, `analysis` and `plot` know nothing of pipelines; the
//! engine modules know nothing of candle.
#![warn(missing_docs)]

pub mod analysis;
pub mod bench;
pub mod cli;
pub mod curvature;
pub mod data;
pub mod device;
pub mod error;
pub mod exec;
pub mod expand;
pub mod graph;
pub mod key;
pub mod nn;
pub mod plot;
pub mod report;
pub mod spec;
pub mod stages;
pub mod store;
pub mod toy;
pub mod train;
