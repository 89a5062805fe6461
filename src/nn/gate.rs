//! The conv net's activation after each convolution, a = maxpool₂(ReLU(z)) or ReLU(z), with its
//! gate ∂a/∂z (1 where z > 0 and, under a pool, z is its window's maximum; 0 elsewhere), and the
//! gated backward step δ = unpool(u) ⊙ gate, and the forward tangent through it (t ⊙ gate, summed
//! over each pool window; for the ResNets, a sum of tangents gated). On the CPU each is one
//! parallel pass over the channels-last tensor (candle's elementwise ops, reductions and pads run
//! one after another, each on one thread: nearly half of a CNN step); elsewhere they are composed
//! from candle ops. Both give the same values.

use candle_core::{Result, Tensor};
use rayon::prelude::*;

use super::{cpu_f32, with_cpu_f32};

/// z = y + bias for y (N, H, W, C) and bias (C,); a = ReLU(z), max-pooled 2×2 with stride 2 when
/// `pool` (an odd last row or column dropped), and the gate (N, H, W, C).
pub fn activate(y: &Tensor, bias: &Tensor, pool: bool) -> Result<(Tensor, Tensor)> {
    let dims = y.dims4()?;
    if bias.dims() != [dims.3] {
        candle_core::bail!(
            "activation: a bias of shape {:?} for {} channels",
            bias.dims(),
            dims.3
        );
    }
    if pool && (dims.1 < 2 || dims.2 < 2) {
        candle_core::bail!(
            "max pool: input {}×{} is too small for a 2×2 window",
            dims.1,
            dims.2
        );
    }
    let fast = with_cpu_f32(y, |ys| {
        with_cpu_f32(bias, |bs| {
            if pool {
                pool_cpu(ys, bs, dims)
            } else {
                relu_cpu(ys, bs)
            }
        })
    })
    .flatten();
    match fast {
        Some((a, gate)) => {
            let (n, h, w, c) = dims;
            let a_dims = if pool { (n, h / 2, w / 2, c) } else { dims };
            Ok((
                Tensor::from_vec(a, a_dims, y.device())?,
                Tensor::from_vec(gate, dims, y.device())?,
            ))
        }
        None => activate_by_ops(y, bias, pool),
    }
}

/// [`activate`] composed from candle ops.
fn activate_by_ops(y: &Tensor, bias: &Tensor, pool: bool) -> Result<(Tensor, Tensor)> {
    let z = y.broadcast_add(bias)?;
    let gate = z.gt(0.0)?.to_dtype(z.dtype())?;
    let a = z.relu()?;
    if !pool {
        return Ok((a, gate));
    }
    let (pooled, mask) = max_pool(&a)?;
    Ok((pooled, (gate * mask)?))
}

fn relu_cpu(ys: &[f32], bs: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (c, len) = (bs.len(), ys.len());
    // Written once, never zeroed first (the allocator's zeroing took 2 % of a ResNet step).
    let mut a = Vec::with_capacity(len);
    let mut gate = Vec::with_capacity(len);
    a.spare_capacity_mut()[..len]
        .par_chunks_mut(c)
        .zip(gate.spare_capacity_mut()[..len].par_chunks_mut(c))
        .zip(ys.par_chunks(c))
        .for_each(|((a, g), y)| {
            for i in 0..c {
                let z = y[i] + bs[i];
                a[i].write(z.max(0f32));
                g[i].write(if z > 0.0 { 1.0 } else { 0.0 });
            }
        });
    // SAFETY: `ys` holds whole rows of c values (its last axis is the bias's, checked by
    // `activate`), so the chunks tile all `len` elements of both vectors, each written above.
    unsafe {
        a.set_len(len);
        gate.set_len(len);
    }
    (a, gate)
}

fn pool_cpu(
    ys: &[f32],
    bs: &[f32],
    (n, h, w, c): (usize, usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    let (ho, wo) = (h / 2, w / 2);
    let mut pooled = vec![0f32; n * ho * wo * c];
    let mut gate = vec![0f32; n * h * w * c];
    // One task per pooled row: one row of the output and the two input rows it pools (an odd
    // last row or column keeps its zero gate).
    let pool_image = |img: usize, out: &mut [f32], g: &mut [f32]| {
        out.par_chunks_mut(wo * c)
            .zip(g[..2 * ho * w * c].par_chunks_mut(2 * w * c))
            .enumerate()
            .for_each(|(i, (out, g))| {
                let rows = &ys[(img * h + 2 * i) * w * c..][..2 * w * c];
                for j in 0..wo {
                    for ch in 0..c {
                        let at = |q: usize| ((q / 2) * w + 2 * j + q % 2) * c + ch;
                        let z = [0, 1, 2, 3].map(|q| rows[at(q)] + bs[ch]);
                        let r = z.map(|v| v.max(0f32));
                        let m = r[0].max(r[1]).max(r[2].max(r[3]));
                        out[j * c + ch] = m;
                        for q in 0..4 {
                            g[at(q)] = if z[q] > 0.0 && r[q] == m { 1.0 } else { 0.0 };
                        }
                    }
                }
            });
    };
    pooled
        .par_chunks_mut(ho * wo * c)
        .zip(gate.par_chunks_mut(h * w * c))
        .enumerate()
        .for_each(|(img, (out, g))| pool_image(img, out, g));
    (pooled, gate)
}

/// δ = unpool(u) ⊙ gate for u (N, H/2, W/2, C) when `pool`, else u ⊙ gate; gate (N, H, W, C).
pub fn gate_gradient(u: &Tensor, gate: &Tensor, pool: bool) -> Result<Tensor> {
    if !pool {
        return gated_sum(&[u], gate);
    }
    let dims = gate.dims4()?;
    let fast = with_cpu_f32(u, |us| with_cpu_f32(gate, |gs| unpool_cpu(us, gs, dims))).flatten();
    match fast {
        Some(delta) => Tensor::from_vec(delta, dims, u.device()),
        None => unpool(u, dims.1, dims.2)? * gate,
    }
}

/// The tangent of [`activate`]'s output along a tangent `t` of its input, which holds the values of
/// `gate` (N, H, W, C) in any shape: t ⊙ gate, summed over each 2×2 window when `pool` (the gate
/// already picks the window maxima), (N, H/2, W/2, C); t ⊙ gate otherwise.
pub fn gate_tangent(t: &Tensor, gate: &Tensor, pool: bool) -> Result<Tensor> {
    if !pool {
        return gated_sum(&[t], gate);
    }
    let dims = gate.dims4()?;
    let t = t.reshape(dims)?;
    let fast = with_cpu_f32(&t, |ts| {
        with_cpu_f32(gate, |gs| window_sums_cpu(ts, gs, dims))
    })
    .flatten();
    match fast {
        Some(sums) => {
            let (n, h, w, c) = dims;
            Tensor::from_vec(sums, (n, h / 2, w / 2, c), t.device())
        }
        None => window_sums_by_ops(&t, gate),
    }
}

/// (t₀ + t₁ + …) ⊙ `gate`, the terms added from left to right: the tangent of a ReLU whose input
/// is a sum (the ResNets' tangents, a convolution along the input's tangent plus one along the
/// weights' and a shortcut), shaped like `gate`. Each term holds `gate`'s number of values in
/// any shape. On the CPU one parallel pass, candle's adds and product in the same order (same
/// bits); elsewhere those ops.
pub fn gated_sum(terms: &[&Tensor], gate: &Tensor) -> Result<Tensor> {
    let Some((first, rest)) = terms.split_first() else {
        candle_core::bail!("gated sum of no terms");
    };
    let fast = {
        let guards: Vec<_> = terms
            .iter()
            .chain([&gate])
            .map(|t| t.storage_and_layout())
            .collect();
        let values: Option<Vec<&[f32]>> = guards.iter().map(|(s, l)| cpu_f32(s, l)).collect();
        values
            .filter(|v| v.iter().all(|t| t.len() == gate.elem_count()))
            .map(|v| gated_sum_cpu(&v[..terms.len()], v[terms.len()]))
    };
    if let Some(out) = fast {
        return Tensor::from_vec(out, gate.shape(), gate.device());
    }
    let mut sum = first.reshape(gate.shape())?;
    for t in rest {
        sum = (sum + t.reshape(gate.shape())?)?;
    }
    sum * gate
}

/// Values per block of [`gated_sum_cpu`]: a stack buffer the compiler can vectorise over.
const SUM_BLOCK: usize = 64;

fn gated_sum_cpu(terms: &[&[f32]], gs: &[f32]) -> Vec<f32> {
    let (chunk, len) = (64 * SUM_BLOCK, gs.len());
    // Written once, never zeroed first (see `relu_cpu`).
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(chunk)
        .enumerate()
        .for_each(|(c, out)| {
            for (b, out) in out.chunks_mut(SUM_BLOCK).enumerate() {
                let at = c * chunk + b * SUM_BLOCK;
                let n = out.len();
                let mut sum = [0f32; SUM_BLOCK];
                sum[..n].copy_from_slice(&terms[0][at..at + n]);
                for t in &terms[1..] {
                    for (s, v) in sum.iter_mut().zip(&t[at..at + n]) {
                        *s += *v;
                    }
                }
                for ((o, s), g) in out.iter_mut().zip(&sum).zip(&gs[at..at + n]) {
                    o.write(s * g);
                }
            }
        });
    // SAFETY: the chunks and their blocks tile all `len` elements, each written above.
    unsafe { out.set_len(len) };
    out
}

/// [`gate_tangent`]'s pooled case composed from candle ops, for `t` shaped like `gate`.
fn window_sums_by_ops(t: &Tensor, gate: &Tensor) -> Result<Tensor> {
    windows(&(t * gate)?)?.sum(4)?.sum(2)
}

/// The 2×2 windows of `t` (N, H, W, C) as (N, H/2, 2, W/2, 2, C), an odd last row or column dropped.
fn windows(t: &Tensor) -> Result<Tensor> {
    let (n, h, w, c) = t.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    t.narrow(1, 0, 2 * ho)?
        .narrow(2, 0, 2 * wo)?
        .reshape((n, ho, 2, wo, 2, c))
}

fn window_sums_cpu(ts: &[f32], gs: &[f32], (n, h, w, c): (usize, usize, usize, usize)) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut sums = vec![0f32; n * ho * wo * c];
    sums.par_chunks_mut(wo * c)
        .enumerate()
        .for_each(|(row, out)| {
            let first = (row / ho * h + 2 * (row % ho)) * w * c;
            for j in 0..wo {
                for ch in 0..c {
                    let x = |q: usize| {
                        let at = first + ((q / 2) * w + 2 * j + q % 2) * c + ch;
                        ts[at] * gs[at]
                    };
                    // In candle's order (each row's pair from 0, then the rows), so that both
                    // paths give the same bits, signed zeros included.
                    out[j * c + ch] = ((0.0 + x(0)) + x(1)) + ((0.0 + x(2)) + x(3));
                }
            }
        });
    sums
}

fn unpool_cpu(us: &[f32], gs: &[f32], (_, h, w, c): (usize, usize, usize, usize)) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    let mut delta = vec![0f32; gs.len()];
    delta
        .par_chunks_mut(w * c)
        .zip(gs.par_chunks(w * c))
        .enumerate()
        .for_each(|(row, (d, g))| {
            let (img, r) = (row / h, row % h);
            if r / 2 >= ho {
                return; // a dropped odd row: 0 · gate
            }
            let src = &us[(img * ho + r / 2) * wo * c..][..wo * c];
            for col in 0..2 * wo {
                for ch in 0..c {
                    let at = col * c + ch;
                    d[at] = src[(col / 2) * c + ch] * g[at];
                }
            }
        });
    delta
}

/// 2×2 max pooling with stride 2 of `a` (N, H, W, C), dropping an odd last row or column: the pooled
/// tensor and the 0/1 mask (N, H, W, C) of the window maxima ([`activate`] checks the size).
fn max_pool(a: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, h, w, c) = a.dims4()?;
    let (ho, wo) = (h / 2, w / 2);
    let windows = windows(a)?;
    let pooled = windows.max_keepdim(4)?.max_keepdim(2)?;
    let mask = windows
        .broadcast_eq(&pooled)?
        .to_dtype(a.dtype())?
        .reshape((n, 2 * ho, 2 * wo, c))?
        .pad_with_zeros(1, 0, h - 2 * ho)?
        .pad_with_zeros(2, 0, w - 2 * wo)?;
    Ok((pooled.reshape((n, ho, wo, c))?, mask))
}

/// Spreads the gradient `u` (N, H/2, W/2, C) of a pooled tensor over its 2×2 windows, (N, H, W, C)
/// (zeros in a dropped odd row or column); the pool's mask then picks the maxima.
fn unpool(u: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, ho, wo, c) = u.dims4()?;
    u.reshape((n, ho, 1, wo, 1, c))?
        .broadcast_as((n, ho, 2, wo, 2, c))?
        .reshape((n, 2 * ho, 2 * wo, c))?
        .pad_with_zeros(1, 0, h - 2 * ho)?
        .pad_with_zeros(2, 0, w - 2 * wo)
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;
    use crate::nn::gradcheck::{bits, flat, random_tensor};

    #[test]
    fn max_pool_keeps_the_window_maxima() {
        let a = random_tensor(&[1, 3, 5, 2], 80, 1.0).unwrap();
        let (pooled, mask) = max_pool(&a).unwrap();
        assert_eq!(pooled.dims(), &[1, 1, 2, 2]);
        let av = flat(&a);
        let (pv, mv) = (flat(&pooled), flat(&mask));
        let at = |i: usize, j: usize, c: usize| (i * 5 + j) * 2 + c;
        for c in 0..2 {
            for j in 0..2 {
                let window = [
                    at(0, 2 * j, c),
                    at(0, 2 * j + 1, c),
                    at(1, 2 * j, c),
                    at(1, 2 * j + 1, c),
                ];
                let max = window.iter().map(|&w| av[w]).fold(f64::MIN, f64::max);
                assert_eq!(pv[j * 2 + c], max);
                for &w in &window {
                    assert_eq!(mv[w], if av[w] == max { 1.0 } else { 0.0 });
                }
            }
            // The dropped last row and column pass nothing back.
            for j in 0..5 {
                assert_eq!(mv[at(2, j, c)], 0.0);
            }
            assert_eq!(mv[at(0, 4, c)], 0.0);
            assert_eq!(mv[at(1, 4, c)], 0.0);
        }
    }

    /// f32 values on a grid of halves, so that exact zeros and tied window maxima occur.
    fn coarse(dims: &[usize], seed: u64) -> Tensor {
        let t = random_tensor(dims, seed, 1.5).unwrap();
        (t * 2.0)
            .unwrap()
            .round()
            .unwrap()
            .affine(0.5, 0.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    #[test]
    fn fused_cpu_passes_equal_the_composed_ops() {
        // Odd sizes (a dropped row and column under the pool), and an input that is a view.
        for (dims, pool) in [
            ([3, 7, 5, 4], true),
            ([3, 7, 5, 4], false),
            ([2, 6, 8, 3], true),
        ] {
            let y = coarse(&[dims[0], dims[1], dims[2], dims[3] + 1], 1)
                .narrow(3, 1, dims[3])
                .unwrap();
            let bias = coarse(&[dims[3]], 2);
            let ties = flat(&y).iter().filter(|v| **v == 0.0).count();
            assert!(ties > 0, "the input should hold exact zeros");
            let (a_ops, g_ops) = activate_by_ops(&y, &bias, pool).unwrap();
            let y = y.contiguous().unwrap();
            let (a, g) = activate(&y, &bias, pool).unwrap();
            assert_eq!(a.dims(), a_ops.dims());
            assert_eq!(flat(&a), flat(&a_ops));
            assert_eq!(flat(&g), flat(&g_ops));

            let u = coarse(a.dims(), 3);
            let (_, h, w, _) = y.dims4().unwrap();
            let spread = if pool {
                unpool(&u, h, w).unwrap()
            } else {
                u.clone()
            };
            let want = flat(&(spread * &g).unwrap());
            assert_eq!(flat(&gate_gradient(&u, &g, pool).unwrap()), want);
        }
        // Ties: a window of equal positive maxima passes the gradient through all of them.
        let y = Tensor::new(&[1f32, 1.0, -1.0, 0.5], &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 2, 2, 1))
            .unwrap();
        let (a, g) = activate(&y, &Tensor::new(&[0f32], y.device()).unwrap(), true).unwrap();
        assert_eq!(flat(&a), [1.0]);
        assert_eq!(flat(&g), [1.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn the_fused_tangent_pass_gives_the_composed_ops_bits() {
        let check = |y: &Tensor, t: &Tensor, pool: bool| -> Vec<u32> {
            let dims = y.dims4().unwrap();
            let (_, gate) = activate(
                y,
                &Tensor::zeros(dims.3, DType::F32, y.device()).unwrap(),
                pool,
            )
            .unwrap();
            // The tangent handed over flat, as the convolution's product gives it.
            let flat_t = t.reshape((dims.0 * dims.1 * dims.2, dims.3)).unwrap();
            let fused = gate_tangent(&flat_t, &gate, pool).unwrap();
            let composed = if pool {
                window_sums_by_ops(t, &gate).unwrap()
            } else {
                (t * &gate).unwrap()
            };
            assert_eq!(fused.dims(), composed.dims());
            assert_eq!(bits(&fused), bits(&composed));
            bits(&fused)
        };
        // Odd sizes (a dropped row and column), zeros and ties.
        for (dims, pool) in [
            ([3, 7, 5, 4], true),
            ([2, 6, 8, 3], true),
            ([2, 6, 8, 3], false),
        ] {
            check(&coarse(&dims, 4), &coarse(&dims, 6), pool);
        }
        // A closed gate times a negative tangent is −0 everywhere; candle's sums from +0 give +0.
        let closed = coarse(&[2, 4, 4, 3], 7)
            .abs()
            .unwrap()
            .affine(-1.0, -0.5)
            .unwrap();
        let negative = coarse(&[2, 4, 4, 3], 8)
            .abs()
            .unwrap()
            .affine(-1.0, -0.5)
            .unwrap();
        assert!(check(&closed, &negative, true).iter().all(|&b| b == 0));
    }

    #[test]
    fn the_gated_sum_gives_the_composed_ops_bits() {
        // 2·3·5·7 = 210 values: three blocks of 64 and a partial one. Terms of different scales,
        // whose sums round differently in another order; a −0 term last.
        let dims = [2, 3, 5, 7];
        let gate = coarse(&dims, 9)
            .gt(0.0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let terms: Vec<Tensor> = [(10, 1.0), (11, 3.0), (12, 0.3)]
            .into_iter()
            .map(|(seed, scale)| {
                let t = random_tensor(&dims, seed, scale).unwrap();
                t.to_dtype(DType::F32).unwrap()
            })
            .collect();
        let negative_zero =
            Tensor::from_vec(vec![-0f32; 210], 210, &candle_core::Device::Cpu).unwrap();
        for count in 1..=3 {
            let mut given: Vec<&Tensor> = terms[..count].iter().collect();
            given.push(&negative_zero);
            let mut composed = given[0].clone();
            for t in &given[1..] {
                composed = (composed + t.reshape(gate.shape()).unwrap()).unwrap();
            }
            let composed = (composed * &gate).unwrap();
            let fused = gated_sum(&given, &gate).unwrap();
            assert_eq!(fused.dims(), gate.dims());
            assert_eq!(bits(&fused), bits(&composed), "{count} terms and −0");
        }
        let err = gated_sum(&[], &gate).unwrap_err().to_string();
        assert!(err.contains("no terms"), "{err}");
    }
}
