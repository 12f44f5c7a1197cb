//! The EDM2 network (Karras et al., "Analyzing and Improving the Training Dynamics of
//! Diffusion Models", arXiv 2312.02696): magnitude-preserving layers (config G), the U-Net,
//! and the preconditioning with the learned log-variance head, in candle.
//!
//! Facts follow NVlabs/edm2 `training/networks_edm2.py`; parameter names equal its state-dict
//! keys (`unet.enc.16x16_block0.conv_res0.weight`, …) so converted EDM2 weights load as they
//! are. Every operation has a backward pass: on the CPU the fused kernels of `fused` (each
//! with its own), elsewhere the definitions in [`composed`], built from candle ops that have
//! one (no `softmax_last_dim`, `rms_norm`, `layer_norm` or `sdpa`), so the same code trains.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

mod cpu;
pub mod formula;
pub mod parity;

use cpu::fused;
pub use cpu::{
    conv2d_same, conv2d_same_act, set_winograd, winograd_applies, winograd_enabled, InputAct,
};

pub mod sampler;

/// Network configuration, with EDM2's names and defaults (`Precond` + `UNet` + `Block`
/// arguments). Stored with every run trained by hindsight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edm2Config {
    /// Image side in pixels.
    pub img_resolution: usize,
    /// Image channels (3 for RGB; 4 for EDM2's latent models).
    pub img_channels: usize,
    /// Number of classes; 0 for an unconditional model.
    pub label_dim: usize,
    /// EDM2 runs the U-Net in fp16 on GPUs; hindsight computes in f32 (accepted for
    /// compatibility with EDM2 configs, otherwise ignored).
    #[serde(default)]
    pub use_fp16: bool,
    /// Expected standard deviation of the training data.
    #[serde(default = "defaults::sigma_data")]
    pub sigma_data: f64,
    /// Fourier features of the log-variance head.
    #[serde(default = "defaults::logvar_channels")]
    pub logvar_channels: usize,
    /// Base channel count.
    #[serde(default = "defaults::model_channels")]
    pub model_channels: usize,
    /// Channel multiplier per resolution level.
    #[serde(default = "defaults::channel_mult")]
    pub channel_mult: Vec<usize>,
    /// Multiplier for the noise embedding (default: `channel_mult[0]`).
    #[serde(default)]
    pub channel_mult_noise: Option<usize>,
    /// Multiplier for the embedding (default: the largest of `channel_mult`).
    #[serde(default)]
    pub channel_mult_emb: Option<usize>,
    /// Residual blocks per level.
    #[serde(default = "defaults::num_blocks")]
    pub num_blocks: usize,
    /// Resolutions with self-attention.
    #[serde(default = "defaults::attn_resolutions")]
    pub attn_resolutions: Vec<usize>,
    /// Balance of the noise and class embeddings.
    #[serde(default = "defaults::half")]
    pub label_balance: f64,
    /// Balance of the decoder input and its skip connection.
    #[serde(default = "defaults::half")]
    pub concat_balance: f64,
    /// Channels per attention head.
    #[serde(default = "defaults::channels_per_head")]
    pub channels_per_head: usize,
    /// Dropout probability in the residual branch (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Balance of the residual branch.
    #[serde(default = "defaults::balance")]
    pub res_balance: f64,
    /// Balance of the attention branch.
    #[serde(default = "defaults::balance")]
    pub attn_balance: f64,
    /// Activations are clipped to ±this.
    #[serde(default = "defaults::clip_act")]
    pub clip_act: f64,
}

mod defaults {
    pub fn sigma_data() -> f64 {
        0.5
    }
    pub fn logvar_channels() -> usize {
        128
    }
    pub fn model_channels() -> usize {
        192
    }
    pub fn channel_mult() -> Vec<usize> {
        vec![1, 2, 3, 4]
    }
    pub fn num_blocks() -> usize {
        3
    }
    pub fn attn_resolutions() -> Vec<usize> {
        vec![16, 8]
    }
    pub fn half() -> f64 {
        0.5
    }
    pub fn channels_per_head() -> usize {
        64
    }
    pub fn balance() -> f64 {
        0.3
    }
    pub fn clip_act() -> f64 {
        256.0
    }
}

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

/// Magnitude-preserving Fourier features of a noise level.
#[derive(Clone, Debug)]
pub struct MpFourier {
    freqs: Tensor,
    phases: Tensor,
}

impl MpFourier {
    /// Loads `freqs` and `phases` (buffers in EDM2's state dict).
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            freqs: vb.get(channels, "freqs")?,
            phases: vb.get(channels, "phases")?,
        })
    }

    /// `cos(x ⊗ freqs + phases) · sqrt(2)` for `x` of shape \[N\].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let y = x
            .reshape((n, 1))?
            .broadcast_mul(&self.freqs.unsqueeze(0)?)?;
        y.broadcast_add(&self.phases.unsqueeze(0)?)?.cos()? * std::f64::consts::SQRT_2
    }
}

/// The gain of an [`MpConv`]: 1, or a learned scalar.
#[derive(Clone, Copy, Debug)]
pub enum Gain<'a> {
    /// Unit gain.
    One,
    /// A scalar parameter.
    Param(&'a Tensor),
}

/// Magnitude-preserving convolution or linear layer with weight normalisation.
#[derive(Clone, Debug)]
pub struct MpConv {
    /// The raw weight, [out, in] or [out, in, kh, kw].
    pub weight: Tensor,
}

impl MpConv {
    /// Loads `weight` with shape `[out, in, kernel…]` (`kernel` empty for a linear layer).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: &[usize],
    ) -> Result<Self> {
        let mut shape = vec![out_channels, in_channels];
        shape.extend_from_slice(kernel);
        Ok(Self {
            weight: vb.get(shape, "weight")?,
        })
    }

    /// The weight as the forward pass uses it: normalised per output channel, then scaled by
    /// `gain / sqrt(fan_in)`.
    pub fn effective_weight(&self, gain: Gain<'_>) -> Result<Tensor> {
        let fan_in: usize = self.weight.dims()[1..].iter().product();
        let w = normalize(&self.weight, None)?;
        let w = w.affine(1.0 / (fan_in as f64).sqrt(), 0.0)?;
        match gain {
            Gain::One => Ok(w),
            Gain::Param(g) => w.broadcast_mul(g),
        }
    }

    /// Applies the layer: `x @ wᵀ` for a linear layer, a same-padded convolution otherwise.
    pub fn forward(&self, x: &Tensor, gain: Gain<'_>) -> Result<Tensor> {
        self.forward_act(x, gain, InputAct::Identity)
    }

    /// [`Self::forward`] of `act(x)` (for a convolution, the activation runs inside it).
    pub fn forward_act(&self, x: &Tensor, gain: Gain<'_>, act: InputAct) -> Result<Tensor> {
        let w = self.effective_weight(gain)?;
        if w.rank() == 2 {
            return act.apply_to(x)?.matmul(&w.t()?);
        }
        conv2d_same_act(x, &w, act)
    }
}

/// Encoder or decoder flavour of a [`Block`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Skip projection and pixel norm before the residual branch.
    Enc,
    /// Skip projection after it.
    Dec,
}

/// EDM2's residual block with optional self-attention.
#[derive(Clone, Debug)]
pub struct Block {
    flavor: Flavor,
    resample: Resample,
    num_heads: usize,
    res_balance: f64,
    attn_balance: f64,
    clip_act: f64,
    emb_gain: Tensor,
    conv_res0: MpConv,
    emb_linear: MpConv,
    conv_res1: MpConv,
    conv_skip: Option<MpConv>,
    attn_qkv: Option<MpConv>,
    attn_proj: Option<MpConv>,
    /// Output channels.
    pub out_channels: usize,
}

impl Block {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        cfg: &Edm2Config,
        in_channels: usize,
        out_channels: usize,
        emb_channels: usize,
        flavor: Flavor,
        resample: Resample,
        attention: bool,
    ) -> Result<Self> {
        let num_heads = if attention {
            out_channels / cfg.channels_per_head
        } else {
            0
        };
        let res0_in = if flavor == Flavor::Enc {
            out_channels
        } else {
            in_channels
        };
        Ok(Self {
            flavor,
            resample,
            num_heads,
            res_balance: cfg.res_balance,
            attn_balance: cfg.attn_balance,
            clip_act: cfg.clip_act,
            emb_gain: vb.get((), "emb_gain")?,
            conv_res0: MpConv::new(vb.pp("conv_res0"), res0_in, out_channels, &[3, 3])?,
            emb_linear: MpConv::new(vb.pp("emb_linear"), emb_channels, out_channels, &[])?,
            conv_res1: MpConv::new(vb.pp("conv_res1"), out_channels, out_channels, &[3, 3])?,
            conv_skip: (in_channels != out_channels)
                .then(|| MpConv::new(vb.pp("conv_skip"), in_channels, out_channels, &[1, 1]))
                .transpose()?,
            attn_qkv: (num_heads != 0)
                .then(|| MpConv::new(vb.pp("attn_qkv"), out_channels, out_channels * 3, &[1, 1]))
                .transpose()?,
            attn_proj: (num_heads != 0)
                .then(|| MpConv::new(vb.pp("attn_proj"), out_channels, out_channels, &[1, 1]))
                .transpose()?,
            out_channels,
        })
    }

    fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let mut x = resample(x, self.resample)?;
        if self.flavor == Flavor::Enc {
            if let Some(skip) = &self.conv_skip {
                x = skip.forward(&x, Gain::One)?;
            }
            x = normalize(&x, Some(&[1]))?;
        }
        let y = self
            .conv_res0
            .forward_act(&x, Gain::One, InputAct::MpSilu)?;
        let c = (self.emb_linear.forward(emb, Gain::Param(&self.emb_gain))? + 1.0)?;
        let y = modulated_mp_silu(&y, &c)?;
        let y = self.conv_res1.forward(&y, Gain::One)?;
        if self.flavor == Flavor::Dec {
            if let Some(skip) = &self.conv_skip {
                x = skip.forward(&x, Gain::One)?;
            }
        }
        // The block ends with its last sum clipped to ±clip_act (one fused op on the CPU).
        let (Some(qkv), Some(proj)) = (&self.attn_qkv, &self.attn_proj) else {
            return mp_sum_clip(&x, &y, self.res_balance, Some(self.clip_act));
        };
        let x = mp_sum(&x, &y, self.res_balance)?;
        let y = normalized_attention(&qkv.forward(&x, Gain::One)?, self.num_heads)?;
        let y = proj.forward(&y, Gain::One)?;
        mp_sum_clip(&x, &y, self.attn_balance, Some(self.clip_act))
    }
}

enum EncLayer {
    Conv(MpConv),
    Block(Block),
}

/// EDM2's U-Net.
pub struct UNet {
    label_balance: f64,
    concat_balance: f64,
    out_gain: Tensor,
    emb_fourier: MpFourier,
    emb_noise: MpConv,
    emb_label: Option<MpConv>,
    enc: Vec<(String, EncLayer)>,
    dec: Vec<(String, Block)>,
    out_conv: MpConv,
}

impl UNet {
    /// Builds the U-Net under `vb` (EDM2's `unet.` prefix is the caller's).
    pub fn new(vb: VarBuilder, cfg: &Edm2Config) -> Result<Self> {
        let cblock: Vec<usize> = cfg
            .channel_mult
            .iter()
            .map(|m| cfg.model_channels * m)
            .collect();
        let cnoise = cfg
            .channel_mult_noise
            .map_or(cblock[0], |m| cfg.model_channels * m);
        let cemb = cfg
            .channel_mult_emb
            .map_or(*cblock.iter().max().unwrap_or(&0), |m| {
                cfg.model_channels * m
            });
        // Every block shares the configuration and the embedding width.
        let block = |vb: &VarBuilder, name: &str, cin, cout, flavor, resample, attention| {
            Block::new(
                vb.pp(name),
                cfg,
                cin,
                cout,
                cemb,
                flavor,
                resample,
                attention,
            )
        };
        let venc = vb.pp("enc");
        let mut enc = Vec::new();
        let mut cout = cfg.img_channels + 1;
        for (level, &channels) in cblock.iter().enumerate() {
            let res = cfg.img_resolution >> level;
            if level == 0 {
                let cin = cout;
                cout = channels;
                let name = format!("{res}x{res}_conv");
                enc.push((
                    name.clone(),
                    EncLayer::Conv(MpConv::new(venc.pp(&name), cin, cout, &[3, 3])?),
                ));
            } else {
                let name = format!("{res}x{res}_down");
                let b = block(&venc, &name, cout, cout, Flavor::Enc, Resample::Down, false)?;
                enc.push((name, EncLayer::Block(b)));
            }
            for idx in 0..cfg.num_blocks {
                let cin = cout;
                cout = channels;
                let name = format!("{res}x{res}_block{idx}");
                let attention = cfg.attn_resolutions.contains(&res);
                let b = block(
                    &venc,
                    &name,
                    cin,
                    cout,
                    Flavor::Enc,
                    Resample::Keep,
                    attention,
                )?;
                enc.push((name, EncLayer::Block(b)));
            }
        }
        let mut skips: Vec<usize> = enc
            .iter()
            .map(|(_, l)| match l {
                EncLayer::Conv(c) => c.weight.dim(0).unwrap_or(0),
                EncLayer::Block(b) => b.out_channels,
            })
            .collect();
        let vdec = vb.pp("dec");
        let mut dec = Vec::new();
        for (level, &channels) in cblock.iter().enumerate().rev() {
            let res = cfg.img_resolution >> level;
            if level == cblock.len() - 1 {
                for (i, attention) in [(0, true), (1, false)] {
                    let name = format!("{res}x{res}_in{i}");
                    let b = block(
                        &vdec,
                        &name,
                        cout,
                        cout,
                        Flavor::Dec,
                        Resample::Keep,
                        attention,
                    )?;
                    dec.push((name, b));
                }
            } else {
                let name = format!("{res}x{res}_up");
                let b = block(&vdec, &name, cout, cout, Flavor::Dec, Resample::Up, false)?;
                dec.push((name, b));
            }
            for idx in 0..=cfg.num_blocks {
                let cin = cout + skips.pop().expect("one skip per encoder layer");
                cout = channels;
                let name = format!("{res}x{res}_block{idx}");
                let attention = cfg.attn_resolutions.contains(&res);
                let b = block(
                    &vdec,
                    &name,
                    cin,
                    cout,
                    Flavor::Dec,
                    Resample::Keep,
                    attention,
                )?;
                dec.push((name, b));
            }
        }
        Ok(Self {
            label_balance: cfg.label_balance,
            concat_balance: cfg.concat_balance,
            out_gain: vb.get((), "out_gain")?,
            emb_fourier: MpFourier::new(vb.pp("emb_fourier"), cnoise)?,
            emb_noise: MpConv::new(vb.pp("emb_noise"), cnoise, cemb, &[])?,
            emb_label: (cfg.label_dim != 0)
                .then(|| MpConv::new(vb.pp("emb_label"), cfg.label_dim, cemb, &[]))
                .transpose()?,
            enc,
            dec,
            out_conv: MpConv::new(vb.pp("out_conv"), cout, cfg.img_channels, &[3, 3])?,
        })
    }

    /// `x` [N, C, H, W], `noise_labels` \[N\], `class_labels` [N, label_dim] (one-hot or soft).
    pub fn forward(
        &self,
        x: &Tensor,
        noise_labels: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mut emb = self
            .emb_noise
            .forward(&self.emb_fourier.forward(noise_labels)?, Gain::One)?;
        if let (Some(layer), Some(labels)) = (&self.emb_label, class_labels) {
            let scaled = (labels * (labels.dim(1)? as f64).sqrt())?;
            let label_emb = layer.forward(&scaled, Gain::One)?;
            emb = mp_sum(
                &emb,
                &label_emb.broadcast_as(emb.shape())?,
                self.label_balance,
            )?;
        }
        let emb = mp_silu(&emb)?;
        let (n, _, h, w) = x.dims4()?;
        let ones = Tensor::ones((n, 1, h, w), x.dtype(), x.device())?;
        let mut x = Tensor::cat(&[x, &ones], 1)?;
        let mut skips = Vec::with_capacity(self.enc.len());
        for (_, layer) in &self.enc {
            x = match layer {
                EncLayer::Conv(c) => c.forward(&x, Gain::One)?,
                EncLayer::Block(b) => b.forward(&x, &emb)?,
            };
            skips.push(x.clone());
        }
        for (name, block) in &self.dec {
            if name.contains("block") {
                let skip = skips.pop().expect("one skip per decoder block");
                x = mp_cat(&x, &skip, self.concat_balance)?;
            }
            x = block.forward(&x, &emb)?;
        }
        self.out_conv.forward(&x, Gain::Param(&self.out_gain))
    }
}

/// EDM2's preconditioned denoiser `D(x; σ)` with the learned log-variance head.
pub struct Precond {
    /// The configuration.
    pub config: Edm2Config,
    unet: UNet,
    logvar_fourier: MpFourier,
    logvar_linear: MpConv,
}

impl Precond {
    /// Builds the network from parameters named as in EDM2's state dict.
    pub fn new(vb: VarBuilder, config: &Edm2Config) -> Result<Self> {
        Ok(Self {
            unet: UNet::new(vb.pp("unet"), config)?,
            logvar_fourier: MpFourier::new(vb.pp("logvar_fourier"), config.logvar_channels)?,
            logvar_linear: MpConv::new(vb.pp("logvar_linear"), config.logvar_channels, 1, &[])?,
            config: config.clone(),
        })
    }

    /// The denoised image `D(x; σ)` and the log-variance `u(σ)` (EDM2 eq. 21), for `x`
    /// [N, C, H, W], `sigma` \[N\] and optional `class_labels` [N, label_dim].
    pub fn forward(
        &self,
        x: &Tensor,
        sigma: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let n = x.dim(0)?;
        let sd = self.config.sigma_data;
        let sigma4 = sigma.reshape((n, 1, 1, 1))?;
        let s2 = (sigma4.sqr()? + sd * sd)?;
        let c_skip = s2.recip()?.affine(sd * sd, 0.0)?;
        let c_out = sigma4.affine(sd, 0.0)?.broadcast_div(&s2.sqrt()?)?;
        let c_in = s2.sqrt()?.recip()?;
        let c_noise = (sigma.log()? / 4.0)?;
        let labels = match (class_labels, self.config.label_dim) {
            (_, 0) => None,
            (Some(l), _) => Some(l.clone()),
            (None, dim) => Some(Tensor::zeros((n, dim), DType::F32, x.device())?),
        };
        let x_in = x.broadcast_mul(&c_in)?;
        let f_x = self.unet.forward(&x_in, &c_noise, labels.as_ref())?;
        let denoised = (x.broadcast_mul(&c_skip)? + f_x.broadcast_mul(&c_out)?)?;
        let logvar = self
            .logvar_linear
            .forward(&self.logvar_fourier.forward(&c_noise)?, Gain::One)?
            .reshape((n, 1, 1, 1))?;
        Ok((denoised, logvar))
    }
}

/// Makes the C allocator keep freed memory in the process (Linux with glibc; elsewhere a
/// no-op). candle allocates a new buffer for every tensor operation; glibc returns large
/// buffers to the kernel when they are freed (mmap threshold, heap trimming), so every
/// training step faulted its whole working set in again and the kernel zeroed it page by
/// page — about a quarter of a CPU training step in a profile. Called by the commands that
/// run the network (train, generate, bench); the memory kept is the step's working set.
#[allow(unsafe_code)] // the crate's one FFI call: libc::mallopt
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Keeps candle's own thread pool for element-wise ops (its "barrier pool": one worker per
/// thread but one, each spinning 25 000 rounds after every op, besides rayon's) from taking
/// the cores from the compute pool: unless the user set `CANDLE_NUM_THREADS`, it is set to a
/// quarter of the compute threads (`RAYON_NUM_THREADS`, else one per core), at least 1. The
/// heavy work (convolutions, fused kernels) runs on rayon; what candle still runs itself in a
/// training step is mostly gradient accumulation (a zero tensor plus an add per graph node).
/// Measured (BENCHMARKS.md), training step with 2 threads on 2 cores: candle's default 0.27–
/// 0.33 s, one candle thread 0.25 s, a lower spin limit instead 0.26–0.31 s; with 16 threads
/// on 16 cores: 16 candle threads 0.19–0.20 s, 4 threads 0.13–0.14 s, 1 thread 0.15–0.16 s.
/// Call it at the start of `main`, before any thread is spawned (it sets an environment
/// variable); candle reads it when its pool is first used.
pub fn leave_cores_to_the_compute_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return;
    }
    let compute = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("CANDLE_NUM_THREADS", (compute / 4).max(1).to_string());
}

/// Runs `work` with the calling thread's compute on a fresh rayon pool of the configured size
/// (`RAYON_NUM_THREADS`, else one per core), as one of that pool's workers. The model's CPU
/// kernels are short parallel sections between serial ones; called from outside a pool, the
/// serial parts would run on an extra thread while every worker spins waiting for the next
/// section, and on a machine with as many cores as workers the spinning workers take the
/// cores from it (measured: 8% of a training step on 2 cores).
pub fn on_compute_pool<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("compute-{i}"))
        .build()
    {
        Ok(pool) => pool.install(work),
        // No threads to be had: the global pool, as before.
        Err(_) => work(),
    }
}

/// The device to compute on: CUDA 0 with the `cuda` feature when available, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}

/// EDM2's training loss (`EDM2Loss`, eq. 21 with the learned uncertainty): per element,
/// `(λ(σ) / e^{u(σ)}) · (D(y + σn; σ) − y)² + u(σ)` with `λ(σ) = (σ² + σ_data²) / (σ·σ_data)²`,
/// for clean images `y` [N, C, H, W], noise levels `sigma` \[N\] and unit noise `noise_unit`.
pub fn edm2_loss(
    net: &Precond,
    images: &Tensor,
    sigma: &Tensor,
    noise_unit: &Tensor,
    class_labels: Option<&Tensor>,
) -> Result<Tensor> {
    let n = images.dim(0)?;
    let sd = net.config.sigma_data;
    let sigma4 = sigma.reshape((n, 1, 1, 1))?;
    let weight = (sigma4.sqr()? + sd * sd)?.broadcast_div(&sigma4.affine(sd, 0.0)?.sqr()?)?;
    let noisy = (images + noise_unit.broadcast_mul(&sigma4)?)?;
    let (denoised, logvar) = net.forward(&noisy, sigma, class_labels)?;
    let scale = weight.broadcast_div(&logvar.exp()?)?;
    (denoised - images)?
        .sqr()?
        .broadcast_mul(&scale)?
        .broadcast_add(&logvar)
}

/// Forced weight normalisation (EDM2 eq. 47 / `MPConv` in training mode): every
/// convolution and linear weight (rank ≥ 2) is replaced by `normalize(w)`; gains and Fourier
/// buffers are left alone. Call before each training step's forward pass.
pub fn force_normalize(params: &[(String, candle_core::Var)]) -> Result<()> {
    for (name, var) in params {
        if name.ends_with(".weight") && var.rank() >= 2 {
            var.set(&normalize(var.as_tensor(), None)?)?;
        }
    }
    Ok(())
}
