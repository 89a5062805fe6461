//! Alignment of per-sample model gradients (appendix K, figures 23–24): for a set of samples, the
//! gradients ∇_θ f_k(x_i) of one model output, their Gram matrix, and histograms of the pairwise
//! dot products and cosines (i < j) and of the squared norms.
//!
//! A model with hand-written passes ends in dense layers, whose per-sample gradients are outer
//! products a δᵀ: their part of the Gram matrix has a closed form in the layers' inputs and deltas
//! ([`gradient_gram`]; the whole of it for the MLP, from one batched pass; 95 % of the CNN's
//! parameters). The gradients of the other parameters (the convolutions; all of them for a model
//! without hand-written passes) of a block of samples are kept as rows of one (block × d) tensor on
//! the model's device, and their Gram matrix is built block by block with a matrix product; when
//! all m rows do not fit in `max_floats`, blocks are recomputed (m² / block² extra backward passes)
//! instead of storing all m·d floats.

use candle_core::{DType, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::batch::random_subset;
use super::{Batch, CandleContext, CurvatureError, Result};
use crate::nn::dense::gradient_gram;
use crate::nn::gradient::backpropagate;
use crate::nn::Model;

/// Counts of values in bins given by edges: bin i is `[edges[i], edges[i+1])`, the last one closed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Strictly increasing bin edges (at least two).
    pub edges: Vec<f64>,
    /// Count per bin (`edges.len() − 1` of them).
    pub counts: Vec<u64>,
    /// Values below the first edge.
    pub below: u64,
    /// Values above the last edge (and NaNs).
    pub above: u64,
}

impl Histogram {
    /// An empty histogram; `field` names the edges in errors.
    pub fn new(edges: &[f64], field: &'static str) -> Result<Self> {
        if edges.len() < 2
            || edges
                .windows(2)
                .any(|w| w[0] >= w[1] || w[1].is_nan() || w[0].is_nan())
        {
            return Err(CurvatureError::Config {
                field,
                message: "bin edges must be at least two strictly increasing numbers".into(),
            });
        }
        Ok(Self {
            edges: edges.to_vec(),
            counts: vec![0; edges.len() - 1],
            below: 0,
            above: 0,
        })
    }

    /// Counts `x`.
    pub fn add(&mut self, x: f64) {
        let last = *self.edges.last().unwrap_or(&f64::NAN);
        if x < self.edges[0] {
            self.below += 1;
        } else if x > last || x.is_nan() {
            self.above += 1;
        } else {
            // Index of the last edge ≤ x, clamped into the last (closed) bin.
            let i = self.edges.partition_point(|e| *e <= x).saturating_sub(1);
            let last_bin = self.counts.len() - 1;
            self.counts[i.min(last_bin)] += 1;
        }
    }
}

/// Bin edges of the three alignment histograms. In YAML each is a list of edges or
/// `{from, to, bins}` for `bins` equal bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignmentBins {
    /// Edges for pairwise dot products ⟨∇f_i, ∇f_j⟩, i < j.
    #[serde(deserialize_with = "edges")]
    pub dots: Vec<f64>,
    /// Edges for pairwise cosines, i < j.
    #[serde(deserialize_with = "edges")]
    pub cosines: Vec<f64>,
    /// Edges for squared norms ‖∇f_i‖².
    #[serde(deserialize_with = "edges")]
    pub sq_norms: Vec<f64>,
}

/// Bin edges as written: explicit, or an equal-width range.
#[derive(Deserialize)]
#[serde(untagged)]
enum EdgesSpec {
    List(Vec<f64>),
    Range { from: f64, to: f64, bins: usize },
}

fn edges<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<f64>, D::Error> {
    match EdgesSpec::deserialize(d)? {
        EdgesSpec::List(edges) => Ok(edges),
        EdgesSpec::Range { from, to, bins } => {
            if bins == 0 || from.partial_cmp(&to) != Some(std::cmp::Ordering::Less) {
                return Err(serde::de::Error::custom(format!(
                    "{{from: {from}, to: {to}, bins: {bins}}} needs from < to and bins ≥ 1"
                )));
            }
            let width = (to - from) / bins as f64;
            Ok((0..=bins)
                .map(|i| {
                    if i == bins {
                        to
                    } else {
                        from + width * i as f64
                    }
                })
                .collect())
        }
    }
}

/// Alignment of per-sample model gradients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlignmentReport {
    /// The samples used (rows of the training set).
    pub samples: Vec<usize>,
    /// Gram matrix `G[i][j]` = ⟨∇f(x_i), ∇f(x_j)⟩ over `samples`.
    pub gram: Vec<Vec<f64>>,
    /// Pairwise dot products, i < j.
    pub dots: Histogram,
    /// Pairwise cosines, i < j (pairs with a zero gradient are skipped).
    pub cosines: Histogram,
    /// Squared norms.
    pub sq_norms: Histogram,
}

impl AlignmentReport {
    /// Summarises a Gram matrix into the three histograms, with the given edges or, without,
    /// [`AUTO_BINS`] equal bins over each statistic's own range (cosines over [−1, 1]).
    pub fn from_gram(
        samples: Vec<usize>,
        gram: Vec<Vec<f64>>,
        bins: Option<&AlignmentBins>,
    ) -> Result<Self> {
        let m = gram.len();
        let mut pair_dots = Vec::with_capacity(m * m.saturating_sub(1) / 2);
        let mut pair_cosines = Vec::with_capacity(pair_dots.capacity());
        let norms: Vec<f64> = (0..m).map(|i| gram[i][i]).collect();
        for i in 0..m {
            for j in i + 1..m {
                pair_dots.push(gram[i][j]);
                let denom = (gram[i][i] * gram[j][j]).sqrt();
                if denom > 0.0 {
                    pair_cosines.push(gram[i][j] / denom);
                }
            }
        }
        let histogram = |values: &[f64], given: Option<&Vec<f64>>, field| {
            let edges = match given {
                Some(edges) => edges.clone(),
                None if field == "bins.cosines" => equal_edges(-1.0, 1.0, AUTO_BINS),
                None => spread(values),
            };
            let mut h = Histogram::new(&edges, field)?;
            values.iter().for_each(|v| h.add(*v));
            Ok::<_, CurvatureError>(h)
        };
        Ok(Self {
            dots: histogram(&pair_dots, bins.map(|b| &b.dots), "bins.dots")?,
            cosines: histogram(&pair_cosines, bins.map(|b| &b.cosines), "bins.cosines")?,
            sq_norms: histogram(&norms, bins.map(|b| &b.sq_norms), "bins.sq_norms")?,
            samples,
            gram,
        })
    }
}

/// Bins per histogram when no edges are given.
pub const AUTO_BINS: usize = 40;

/// `bins` equal bins from `from` to `to` (the last edge exactly `to`).
fn equal_edges(from: f64, to: f64, bins: usize) -> Vec<f64> {
    let width = (to - from) / bins as f64;
    (0..=bins)
        .map(|i| {
            if i == bins {
                to
            } else {
                from + width * i as f64
            }
        })
        .collect()
}

/// [`AUTO_BINS`] equal bins from the smallest to the largest finite value.
fn spread(values: &[f64]) -> Vec<f64> {
    let (lo, hi) = values
        .iter()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(*v), h.max(*v))
        });
    if !lo.is_finite() {
        return equal_edges(0.0, 1.0, AUTO_BINS);
    }
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    };
    equal_edges(lo, hi, AUTO_BINS)
}

fn default_max_floats() -> usize {
    1 << 28
}

/// How [`model_gradient_alignment`] samples and bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignmentConfig {
    /// Number of samples m (drawn uniformly without replacement).
    pub samples: usize,
    /// Seed of that draw (default 0).
    #[serde(default)]
    pub seed: u64,
    /// Which model output f_k to differentiate (default 0, the paper's one-output ±1 setup).
    #[serde(default)]
    pub output: usize,
    /// Most gradient floats held at once (≥ the parameters outside the dense head, the
    /// convolutions'); bounds memory (default 2²⁸, 1 GiB of f32).
    #[serde(default = "default_max_floats")]
    pub max_floats: usize,
    /// Histogram edges (default: [`AUTO_BINS`] equal bins over each statistic's range).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bins: Option<AlignmentBins>,
}

impl AlignmentConfig {
    /// `samples` samples with every other setting at its default.
    pub fn new(samples: usize) -> Self {
        Self {
            samples,
            seed: 0,
            output: 0,
            max_floats: default_max_floats(),
            bins: None,
        }
    }
}

/// The cotangent that picks output `output` of every sample of the outputs `f` (N, K): ones in
/// that column, zeros elsewhere. Records K in `outputs`; where the model has no such output, a
/// zero cotangent stands in until the caller returns [`output_error`].
fn selector(f: &Tensor, output: usize, outputs: &mut usize) -> candle_core::Result<Tensor> {
    let (n, k) = f.dims2()?;
    *outputs = k;
    let row: Vec<f32> = (0..k).map(|j| f32::from(j == output)).collect();
    Tensor::from_vec(row, (1, k), f.device())?
        .to_dtype(f.dtype())?
        .broadcast_as((n, k))?
        .contiguous()
}

/// The error of asking for output `output` of a model with `outputs` outputs.
fn output_error(output: usize, outputs: usize) -> CurvatureError {
    CurvatureError::Config {
        field: "output",
        message: format!("output {output} of a model with {outputs} outputs"),
    }
}

/// How many of a model's parameter tensors, in order, get explicit per-sample gradient rows: all
/// but those of its dense head, whose Gram matrix has a closed form ([`gradient_gram`]).
fn row_params(model: &dyn Model) -> usize {
    let head = model.dense_head().map_or(0, |head| head.params.len());
    model.params().len() - head
}

/// Per-sample gradients of output `output` of a block of samples.
struct GradientRows {
    /// The gradients of the first [`row_params`] parameters, one row (len × d') per sample; `None`
    /// when there are none.
    rows: Option<Tensor>,
    /// The dense head's layer inputs and deltas (each len × width), when it has one.
    head: Option<(Vec<Tensor>, Vec<Tensor>)>,
}

/// Per-layer tensors of several groups of samples (each a list of one tensor per layer), stacked
/// layer by layer along the samples.
fn by_layer(groups: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    let layers = groups.first().map_or(0, Vec::len);
    (0..layers)
        .map(|l| {
            let layer: Vec<Tensor> = groups.iter().map(|g| g[l].clone()).collect();
            Tensor::cat(&layer, 0).ctx("per-sample model gradient")
        })
        .collect()
}

/// [`GradientRows`] of the samples `rows`: one backward pass per sample, by the model's
/// hand-written passes where it has them; a dense stack (nothing but a head) in one batched pass.
fn gradient_rows(
    model: &dyn Model,
    data: &Batch,
    rows: &[usize],
    output: usize,
) -> Result<GradientRows> {
    let ctx = "per-sample model gradient";
    let explicit = row_params(model);
    let passes = if explicit == 0 {
        vec![data.select(rows)?.inputs]
    } else {
        let single = |&r: &usize| data.inputs.narrow(0, r, 1).ctx(ctx);
        rows.iter().map(single).collect::<Result<_>>()?
    };
    let (mut explicit_rows, mut inputs, mut deltas) = (Vec::new(), Vec::new(), Vec::new());
    for x in &passes {
        let mut outputs = 0;
        let pass = backpropagate(model, x, |f| selector(f, output, &mut outputs)).ctx(ctx)?;
        if output >= outputs {
            return Err(output_error(output, outputs));
        }
        if explicit > 0 {
            let parts = pass.gradient[..explicit]
                .iter()
                .map(Tensor::flatten_all)
                .collect::<candle_core::Result<Vec<_>>>()
                .ctx(ctx)?;
            explicit_rows.push(Tensor::cat(&parts, 0).ctx(ctx)?);
        }
        if let Some((a, delta)) = pass.head {
            inputs.push(a);
            deltas.push(delta);
        }
    }
    let rows = match explicit_rows.is_empty() {
        true => None,
        false => Some(Tensor::stack(&explicit_rows, 0).ctx(ctx)?),
    };
    let head = match inputs.is_empty() {
        true => None,
        false => Some((by_layer(inputs)?, by_layer(deltas)?)),
    };
    Ok(GradientRows { rows, head })
}

/// Gram matrix of per-sample gradients of output `output` over `rows`: the explicit gradient
/// rows' products, in blocks of at most `block` samples, plus the dense head's part in closed
/// form ([`gradient_gram`]).
pub fn model_gradient_gram(
    model: &dyn Model,
    data: &Batch,
    rows: &[usize],
    output: usize,
    block: usize,
) -> Result<Vec<Vec<f64>>> {
    let ctx = "model-gradient Gram matrix";
    let block = block.max(1);
    let m = rows.len();
    let mut gram = vec![vec![0.0; m]; m];
    let (mut head_inputs, mut head_deltas) = (Vec::new(), Vec::new());
    let starts: Vec<usize> = (0..m).step_by(block).collect();
    for (bi, &si) in starts.iter().enumerate() {
        let ri = &rows[si..(si + block).min(m)];
        let a = gradient_rows(model, data, ri, output)?;
        if let Some((inputs, deltas)) = a.head {
            head_inputs.push(inputs);
            head_deltas.push(deltas);
        }
        let Some(a) = a.rows else { continue };
        for &sj in &starts[bi..] {
            let rj = &rows[sj..(sj + block).min(m)];
            let b = if sj == si {
                a.clone()
            } else {
                let b = gradient_rows(model, data, rj, output)?.rows;
                b.ok_or_else(|| CurvatureError::Batch("no gradient rows".into()))?
            };
            let g = a
                .matmul(&b.t().ctx(ctx)?)
                .and_then(|g| g.to_dtype(DType::F64))
                .and_then(|g| g.to_vec2::<f64>())
                .ctx(ctx)?;
            for (i, row) in g.iter().enumerate() {
                for (j, v) in row.iter().enumerate() {
                    gram[si + i][sj + j] = *v;
                    gram[sj + j][si + i] = *v;
                }
            }
        }
    }
    if !head_inputs.is_empty() {
        let head = gradient_gram(&by_layer(head_inputs)?, &by_layer(head_deltas)?)
            .and_then(|g| g.to_dtype(DType::F64))
            .and_then(|g| g.to_vec2::<f64>())
            .ctx(ctx)?;
        for (row, head_row) in gram.iter_mut().zip(head) {
            for (v, h) in row.iter_mut().zip(head_row) {
                *v += h;
            }
        }
    }
    Ok(gram)
}

/// Alignment of per-sample model gradients over a seeded random sample of `data`.
pub fn model_gradient_alignment(
    model: &dyn Model,
    data: &Batch,
    cfg: &AlignmentConfig,
) -> Result<AlignmentReport> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let rows =
        random_subset(&mut rng, data.len(), cfg.samples).map_err(|_| CurvatureError::Config {
            field: "samples",
            message: format!("must be in 1..={}, got {}", data.len(), cfg.samples),
        })?;
    // The floats of one sample's explicit gradient row.
    let d: usize = model.params()[..row_params(model)]
        .iter()
        .map(|p| p.var.as_tensor().elem_count())
        .sum();
    if cfg.max_floats < d {
        return Err(CurvatureError::Config {
            field: "max_floats",
            message: format!(
                "{} is below one gradient row ({d} parameters outside the dense head)",
                cfg.max_floats
            ),
        });
    }
    // Two blocks are alive at once.
    let block = (cfg.max_floats / d.max(1) / 2).max(1);
    let gram = model_gradient_gram(model, data, &rows, cfg.output, block)?;
    AlignmentReport::from_gram(rows, gram, cfg.bins.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curvature::testing::{data, dot, flat_gradient, TanhMlp};
    use crate::curvature::ParamVec;
    use crate::nn::gradcheck::random_tensor;
    use crate::nn::ModelSpec;
    use candle_core::Device;

    #[test]
    fn bin_edges_are_a_list_or_an_equal_width_range() {
        let bins: AlignmentBins = serde_json::from_value(serde_json::json!({
            "dots": [0.0, 1.0, 3.0],
            "cosines": {"from": -1.0, "to": 1.0, "bins": 4},
            "sq_norms": {"from": 0.0, "to": 2.0, "bins": 1},
        }))
        .unwrap();
        assert_eq!(bins.dots, vec![0.0, 1.0, 3.0]);
        assert_eq!(bins.cosines, vec![-1.0, -0.5, 0.0, 0.5, 1.0]);
        assert_eq!(bins.sq_norms, vec![0.0, 2.0]);
        let bad = serde_json::from_value::<AlignmentBins>(serde_json::json!({
            "dots": {"from": 1.0, "to": 0.0, "bins": 3}, "cosines": [0.0, 1.0], "sq_norms": [0.0, 1.0],
        }));
        assert!(bad.unwrap_err().to_string().contains("from < to"));
    }

    #[test]
    fn automatic_bins_cover_every_value() {
        let gram = vec![
            vec![4.0, -1.0, 2.0],
            vec![-1.0, 1.0, 0.5],
            vec![2.0, 0.5, 9.0],
        ];
        let r = AlignmentReport::from_gram(vec![0, 1, 2], gram, None).unwrap();
        for h in [&r.dots, &r.cosines, &r.sq_norms] {
            assert_eq!((h.below, h.above, h.counts.len()), (0, 0, AUTO_BINS));
        }
        assert_eq!(r.dots.edges[0], -1.0);
        assert_eq!(*r.dots.edges.last().unwrap(), 2.0);
        assert_eq!(r.cosines.edges[0], -1.0);
        assert_eq!(r.sq_norms.counts.iter().sum::<u64>(), 3);
        // −1/2: the first cosine bin; 1/3 and 2/6.
        assert_eq!(r.cosines.counts.iter().sum::<u64>(), 3);
    }

    #[test]
    fn histogram_bins_are_half_open_with_a_closed_last_bin() {
        let mut h = Histogram::new(&[0.0, 1.0, 2.0], "bins").unwrap();
        for x in [-0.5, 0.0, 0.5, 1.0, 2.0, 2.5, f64::NAN] {
            h.add(x);
        }
        assert_eq!((h.below, h.counts.clone(), h.above), (1, vec![2, 2], 2));
        assert!(Histogram::new(&[1.0, 1.0], "bins.dots")
            .unwrap_err()
            .to_string()
            .contains("bins.dots"));
    }

    /// ∇_θ f_k(x_i) by a plain first-order backward pass per sample, as f64 vectors.
    fn reference_gradients(
        model: &dyn Model,
        batch: &Batch,
        rows: &[usize],
        k: usize,
    ) -> Vec<Vec<f64>> {
        rows.iter()
            .map(|&r| {
                let z = model
                    .forward(&batch.inputs.narrow(0, r, 1).unwrap())
                    .unwrap();
                flat_gradient(model, &z.narrow(1, k, 1).unwrap().sum_all().unwrap())
            })
            .collect()
    }

    #[test]
    fn gram_matches_plain_dot_products_for_every_block_size() {
        let model = TanhMlp::new(3, 4, 2, 31);
        let batch = data(7, [3, 1, 1], 2, 32);
        let rows = [6, 0, 3, 2, 5];
        let g = reference_gradients(&model, &batch, &rows, 1);
        for block in [1, 2, 5] {
            let gram = model_gradient_gram(&model, &batch, &rows, 1, block).unwrap();
            for i in 0..rows.len() {
                for j in 0..rows.len() {
                    assert!(
                        (gram[i][j] - dot(&g[i], &g[j])).abs() < 1e-12,
                        "block {block}"
                    );
                }
            }
        }
    }

    #[test]
    fn gram_of_the_paper_networks_matches_autograd_gradients() {
        // In f64 with nonzero biases: the MLP's Gram matrix in closed form from one batched pass,
        // the CNN's and ResNet-8's from per-sample hand-written passes; the reference
        // differentiates candle's forward by autograd, one sample at a time.
        let mlp = ModelSpec::Mlp {
            depth: 2,
            width: 6,
            activation: crate::nn::Activation::Tanh,
        };
        for spec in [mlp, ModelSpec::Cnn {}, ModelSpec::Resnet { depth: 8 }] {
            let model = spec
                .build([2, 12, 12], 3, 1.0, 41, DType::F64, &Device::Cpu)
                .unwrap();
            // Only the parameters below the dense head get explicit rows (none for the MLP).
            let head = model.dense_head().unwrap().params.len();
            assert_eq!(row_params(model.as_ref()), model.params().len() - head);
            for (i, p) in model.params().iter().enumerate() {
                if p.name.ends_with("bias") {
                    p.var
                        .set(&random_tensor(p.var.dims(), 50 + i as u64, 0.1).unwrap())
                        .unwrap();
                }
            }
            let batch = data(5, [2, 12, 12], 3, 42);
            let rows = [4, 1, 2];
            let error = model_gradient_gram(model.as_ref(), &batch, &rows, 3, 2).unwrap_err();
            assert!(error
                .to_string()
                .contains("output 3 of a model with 3 outputs"));
            let g = reference_gradients(model.as_ref(), &batch, &rows, 2);
            let gram = model_gradient_gram(model.as_ref(), &batch, &rows, 2, 2).unwrap();
            let scale = dot(&g[0], &g[0]);
            for i in 0..rows.len() {
                for j in 0..rows.len() {
                    let want = dot(&g[i], &g[j]);
                    assert!(
                        (gram[i][j] - want).abs() < 1e-10 * scale,
                        "{spec:?} ({i}, {j}): {} vs {want}",
                        gram[i][j]
                    );
                }
            }
        }
    }

    #[test]
    fn report_counts_every_pair_and_is_seeded() {
        let model = TanhMlp::new(3, 4, 1, 33);
        let batch = data(9, [3, 1, 1], 1, 34);
        let d = ParamVec::zeros_for(model.params()).unwrap().dim();
        let cfg = AlignmentConfig {
            samples: 6,
            seed: 35,
            output: 0,
            max_floats: 2 * d * 2,
            bins: Some(AlignmentBins {
                dots: vec![-100.0, 0.0, 100.0],
                cosines: vec![-1.0, 0.0, 1.0],
                sq_norms: vec![0.0, 1.0, 1000.0],
            }),
        };
        let a = model_gradient_alignment(&model, &batch, &cfg).unwrap();
        assert_eq!(a, model_gradient_alignment(&model, &batch, &cfg).unwrap());
        let pairs = 15;
        assert_eq!(
            a.dots.counts.iter().sum::<u64>() + a.dots.below + a.dots.above,
            pairs
        );
        assert_eq!(a.cosines.counts.iter().sum::<u64>(), pairs);
        assert_eq!(a.sq_norms.counts.iter().sum::<u64>(), 6);
        let g = reference_gradients(&model, &batch, &a.samples, 0);
        let positive = (0..6)
            .flat_map(|i| (i + 1..6).map(move |j| (i, j)))
            .filter(|&(i, j)| dot(&g[i], &g[j]) >= 0.0)
            .count();
        assert_eq!(a.cosines.counts[1] as usize, positive);
        let bad = AlignmentConfig {
            output: 1,
            ..cfg.clone()
        };
        assert!(model_gradient_alignment(&model, &batch, &bad)
            .unwrap_err()
            .to_string()
            .contains("output"));
        let bad = AlignmentConfig {
            max_floats: 3,
            ..cfg
        };
        assert!(model_gradient_alignment(&model, &batch, &bad)
            .unwrap_err()
            .to_string()
            .contains("max_floats"));
    }
}
