//! Toy problems with closed-form answers, used for figure 3 and as references: the 1-D quadratic
//! ([`quadratic`]). They use plain `f64`, no candle.

pub mod quadratic;
