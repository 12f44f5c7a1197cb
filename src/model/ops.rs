//! The magnitude-preserving operations of EDM2 (NVlabs/edm2 `training/networks_edm2.py`:
//! `normalize`, `mp_silu`, `mp_sum`, `mp_cat`, `resample`, and the attention core of `Block`),
//! each choosing at run time between its fused CPU kernel (`cpu::fused`, contiguous f32 tensors
//! on the CPU) and its definition in [`composed`] from candle ops (other devices and dtypes).
//! Both have a backward pass, so the same code trains anywhere.

use candle_core::{Result, Tensor, D};

use super::cpu::fused;

/// Epsilon of [`normalize`].
const NORM_EPS: f64 = 1e-4;

/// `x / (ε + ‖x‖·sqrt(n_norm / n_x))` over `dims` (all but the first when `None`): scales each
/// slice to unit RMS (EDM2 eq. 46 and its pixel norm).
pub fn normalize(x: &Tensor, dims: Option<&[usize]>) -> Result<Tensor> {
    let all: Vec<usize> = (1..x.rank()).collect();
    let dims = dims.unwrap_or(&all);
    let consecutive = dims.windows(2).all(|w| w[1] == w[0] + 1);
    if fused::applies(x) && consecutive && !dims.is_empty() {
        let (first, last) = (dims[0], dims[dims.len() - 1]);
        let op = fused::Normalize {
            outer: x.dims()[..first].iter().product(),
            mid: x.dims()[first..=last].iter().product(),
            inner: x.dims()[last + 1..].iter().product(),
            eps: NORM_EPS as f32,
        };
        return x.contiguous()?.apply_op1(op);
    }
    composed::normalize(x, dims)
}

/// Magnitude-preserving SiLU: `silu(x) / 0.596`.
pub fn mp_silu(x: &Tensor) -> Result<Tensor> {
    if fused::applies(x) {
        return x.contiguous()?.apply_op1(fused::Map(fused::MpSilu));
    }
    composed::mp_silu(x)
}

/// `mp_silu(y · c)` with `c` [N, C] scaling the channels of `y` [N, C, H, W] (the embedding's
/// modulation in EDM2's blocks).
pub fn modulated_mp_silu(y: &Tensor, c: &Tensor) -> Result<Tensor> {
    if fused::applies(y) && fused::applies(c) && y.rank() == 4 && c.rank() == 2 {
        return y.contiguous()?.apply_op2(&c.contiguous()?, fused::ModSilu);
    }
    composed::modulated_mp_silu(y, c)
}

/// `clamp(x, −c, c)` (EDM2's activation clipping).
pub fn clip(x: &Tensor, c: f64) -> Result<Tensor> {
    if fused::applies(x) {
        return x.contiguous()?.apply_op1(fused::Map(fused::Clip(c as f32)));
    }
    composed::clip(x, c)
}

/// Magnitude-preserving sum: `lerp(a, b, t) / sqrt((1 − t)² + t²)`.
pub fn mp_sum(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
    mp_sum_clip(a, b, t, None)
}

/// [`mp_sum`] followed by [`clip`] with bound `c` when given (one fused pass on the CPU).
pub fn mp_sum_clip(a: &Tensor, b: &Tensor, t: f64, c: Option<f64>) -> Result<Tensor> {
    let (wa, wb) = composed::mp_sum_weights(t);
    if fused::applies(a) && fused::applies(b) && a.shape() == b.shape() {
        let op = fused::LinComb {
            wa: wa as f32,
            wb: wb as f32,
            clip: c.map(|c| c as f32),
        };
        return a.contiguous()?.apply_op2(&b.contiguous()?, op);
    }
    let sum = composed::mp_sum(a, b, t)?;
    match c {
        Some(c) => composed::clip(&sum, c),
        None => Ok(sum),
    }
}

/// The element-wise operations composed from candle ops (each with candle's backward): what
/// other devices run, and the definitions the fused CPU kernels are tested against.
pub mod composed {
    use candle_core::{Result, Tensor};

    /// [`super::normalize`] over explicit `dims`.
    pub fn normalize(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
        let mut reduced = 1usize;
        for &d in dims {
            reduced *= x.dim(d)?;
        }
        let norm = x.sqr()?.sum_keepdim(dims)?.sqrt()?;
        let denom = norm.affine((1.0 / reduced as f64).sqrt(), super::NORM_EPS)?;
        x.broadcast_div(&denom)
    }

    /// [`super::mp_silu`].
    pub fn mp_silu(x: &Tensor) -> Result<Tensor> {
        x.silu()? / 0.596
    }

    /// [`super::clip`].
    pub fn clip(x: &Tensor, c: f64) -> Result<Tensor> {
        x.clamp(-c, c)
    }

    /// [`super::modulated_mp_silu`].
    pub fn modulated_mp_silu(y: &Tensor, c: &Tensor) -> Result<Tensor> {
        mp_silu(&y.broadcast_mul(&c.unsqueeze(2)?.unsqueeze(3)?)?)
    }

    /// [`super::softmax_last`], composed from differentiable ops.
    pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
        let max = x.max_keepdim(candle_core::D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
    }

    /// The weights of `a` and `b` in [`super::mp_sum`].
    pub fn mp_sum_weights(t: f64) -> (f64, f64) {
        let scale = ((1.0 - t).powi(2) + t * t).sqrt();
        ((1.0 - t) / scale, t / scale)
    }

    /// [`super::mp_sum`].
    pub fn mp_sum(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
        let (wa, wb) = mp_sum_weights(t);
        (a.affine(wa, 0.0)? + b.affine(wb, 0.0)?)?.contiguous()
    }

    /// The weights of `a` and `b` (with `na` and `nb` channels) in [`super::mp_cat`].
    pub fn mp_cat_weights(na: usize, nb: usize, t: f64) -> (f64, f64) {
        let (na, nb) = (na as f64, nb as f64);
        let c = ((na + nb) / ((1.0 - t).powi(2) + t * t)).sqrt();
        (c / na.sqrt() * (1.0 - t), c / nb.sqrt() * t)
    }

    /// [`super::mp_cat`].
    pub fn mp_cat(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
        let (wa, wb) = mp_cat_weights(a.dim(1)?, b.dim(1)?, t);
        Tensor::cat(&[a.affine(wa, 0.0)?, b.affine(wb, 0.0)?], 1)
    }

    /// [`super::attention`].
    pub fn attention(y: &Tensor) -> Result<Tensor> {
        let d = y.dim(2)?;
        let q = y.narrow(3, 0, 1)?.squeeze(3)?.contiguous()?;
        let k = y.narrow(3, 1, 1)?.squeeze(3)?.contiguous()?;
        let v = y.narrow(3, 2, 1)?.squeeze(3)?.contiguous()?;
        let k = (k / (d as f64).sqrt())?;
        // w[n,h,q,k] = Σ_c q[n,h,c,q] k[n,h,c,k]; y[n,h,c,q] = Σ_k w[n,h,q,k] v[n,h,c,k].
        // (The transposes are made contiguous: the form the GPU check ran.)
        let weights = softmax_last(&q.transpose(2, 3)?.contiguous()?.matmul(&k)?)?;
        v.matmul(&weights.transpose(2, 3)?.contiguous()?)
    }

    /// [`super::resample`] with candle's pooling and upsampling.
    pub fn resample(x: &Tensor, mode: super::Resample) -> Result<Tensor> {
        match mode {
            super::Resample::Keep => Ok(x.clone()),
            super::Resample::Down => x.avg_pool2d((2, 2)),
            super::Resample::Up => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(h * 2, w * 2)
            }
        }
    }
}

/// Magnitude-preserving concatenation along channels with balance `t`.
pub fn mp_cat(a: &Tensor, b: &Tensor, t: f64) -> Result<Tensor> {
    let (wa, wb) = composed::mp_cat_weights(a.dim(1)?, b.dim(1)?, t);
    if fused::applies(a)
        && fused::applies(b)
        && a.rank() >= 2
        && a.rank() == b.rank()
        && a.dim(1)? > 0
        && b.dim(1)? > 0
    {
        let op = fused::ScaledCat {
            wa: wa as f32,
            wb: wb as f32,
        };
        return a.contiguous()?.apply_op2(&b.contiguous()?, op);
    }
    composed::mp_cat(a, b, t)
}

/// Resampling with EDM2's default [1, 1] filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// Identity.
    Keep,
    /// 2×2 average pooling.
    Down,
    /// Nearest-neighbour ×2.
    Up,
}

/// Applies `mode` to an NCHW tensor.
pub fn resample(x: &Tensor, mode: Resample) -> Result<Tensor> {
    if mode != Resample::Keep && fused::applies(x) && x.rank() == 4 {
        let (_, _, h, w) = x.dims4()?;
        if mode == Resample::Up || (h % 2 == 0 && w % 2 == 0) {
            let op = fused::Resample2 {
                up: mode == Resample::Up,
                scale: if mode == Resample::Up { 1.0 } else { 0.25 },
                h,
                w,
            };
            return x.contiguous()?.apply_op1(op);
        }
    }
    composed::resample(x, mode)
}

/// The core of self-attention for `y` [N, heads, d, 3, T] (queries, keys and values of each
/// head side by side, normalised): `softmax(QᵀK / √d)` over the keys applied to the values,
/// giving [N, heads, d, T].
pub fn attention(y: &Tensor) -> Result<Tensor> {
    if fused::applies(y) && y.rank() == 5 && y.dim(3)? == 3 {
        let (d, t) = (y.dim(2)?, y.dim(4)?);
        let op = fused::Attention {
            d,
            t,
            scale: (1.0 / (d as f64).sqrt()) as f32,
        };
        return y.contiguous()?.apply_op1(op);
    }
    composed::attention(y)
}

/// EDM2's self-attention between the `qkv` and `proj` convolutions: `y` [N, 3C, H, W] viewed
/// as [N, heads, C / heads, 3, H·W], normalised over the channels of each head, then
/// [`attention`], giving [N, C, H, W] (one fused op on the CPU).
pub fn normalized_attention(y: &Tensor, heads: usize) -> Result<Tensor> {
    let (n, c3, h, w) = y.dims4()?;
    let c = c3 / 3;
    if heads == 0 || c3 % (3 * heads) != 0 {
        candle_core::bail!("attention: {c3} qkv channels for {heads} heads");
    }
    if fused::applies(y) {
        let d = c / heads;
        let op = fused::AttentionNorm {
            attention: fused::Attention {
                d,
                t: h * w,
                scale: (1.0 / (d as f64).sqrt()) as f32,
            },
            eps: NORM_EPS as f32,
        };
        return y.contiguous()?.apply_op1(op);
    }
    let y = y.reshape((n, heads, c / heads, 3, h * w))?;
    attention(&normalize(&y, Some(&[2]))?)?.reshape((n, c, h, w))
}

/// Softmax over the last dimension (with its backward pass; candle-nn's has none).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused::applies(x) {
        let row = x.dim(D::Minus1)?;
        return x.contiguous()?.apply_op1(fused::Softmax { row });
    }
    composed::softmax_last(x)
}
