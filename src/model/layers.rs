//! The layers of EDM2's U-Net (NVlabs/edm2 `training/networks_edm2.py`): the Fourier
//! features of the noise level ([`MpFourier`]), the weight-normalised convolution and linear
//! layer ([`MpConv`]) and the residual block with optional self-attention ([`Block`]).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::config::Edm2Config;
use super::cpu::{conv2d_same_act, InputAct};
use super::ops::{
    modulated_mp_silu, mp_sum, mp_sum_clip, normalize, normalized_attention, resample, Resample,
};

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
    pub(super) fn new(
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

    pub(super) fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
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
