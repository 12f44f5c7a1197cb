//! The CPU kernels: the stride-1 "same" convolution ([`conv`]: direct GEMMs or Winograd's
//! F(2×2, 3×3) in [`winograd`]) and the fused element-wise, resampling and attention ops
//! ([`fused`]), each with its own backward pass, on rayon; and an inference-only convolution
//! with bias and ReLU for feature networks ([`infer`]).
//!
//! Dependencies run one way: [`kernels`] (the vectorised inner loops) ← [`primitives`] (GEMM
//! views, scratch buffers, in-order sums, the input activation) ← [`fused`], [`infer`] and
//! [`winograd`] ← [`conv`]. The ops of `model` choose between these kernels and the composed candle ops.

pub(super) mod conv;
pub(super) mod fused;
mod infer;
mod kernels;
mod primitives;
mod winograd;

pub use conv::{conv2d_same, conv2d_same_act, set_winograd, winograd_applies, winograd_enabled};
pub use infer::conv2d_bias_relu;
pub use primitives::InputAct;
