//! Inference-only convolution for feature networks (Inception-v3 for FID): any kernel shape,
//! stride and zero padding, with the bias and ReLU of a folded batch normalisation applied on
//! the way out. No backward pass (nothing trains through it).
//!
//! Per image `b`, in parallel over images: `y_b[O, Ho·Wo] = W[O, C·kh·kw] · cols_b[C·kh·kw,
//! Ho·Wo]`, with `cols_b` the image lowered (im2col, zero padding written in) in the thread's
//! scratch buffer — or the image itself for a 1×1 stride-1 kernel — then `max(y + bias, 0)` on
//! the block while it is in cache. One single-threaded GEMM per image keeps every thread on its
//! own data; candle's `conv2d` instead lowers the whole batch, multiplies, transposes the
//! result and needs two more passes for the bias and the ReLU.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::primitives::{sgemm, slice_f32, with_scratch, View};

/// `relu(conv2d(x, w, stride, padding) + bias)` on the CPU: `x` [N, C, H, W], `w` [O, C, kh,
/// kw], `bias` [O], padding `(ph, pw)` zeros on each side. f32, contiguous (the tensors are
/// read in place).
pub fn conv2d_bias_relu(
    x: &Tensor,
    w: &Tensor,
    bias: &[f32],
    stride: usize,
    padding: (usize, usize),
) -> Result<Tensor> {
    let (_, c, h, wd) = x.dims4()?;
    let (o, wc, kh, kw) = w.dims4()?;
    let (ph, pw) = padding;
    if wc != c || bias.len() != o || stride == 0 || h + 2 * ph < kh || wd + 2 * pw < kw {
        candle_core::bail!(
            "conv2d_bias_relu: input {:?}, weight {:?}, {} biases, stride {stride}, padding {padding:?}",
            x.dims(),
            w.dims(),
            bias.len()
        );
    }
    x.contiguous()?.apply_op2_no_bwd(
        &w.contiguous()?,
        &ConvBiasRelu {
            bias,
            stride,
            padding,
        },
    )
}

/// The op, so that candle hands over its buffers without copies.
struct ConvBiasRelu<'a> {
    bias: &'a [f32],
    stride: usize,
    padding: (usize, usize),
}

impl CustomOp2 for ConvBiasRelu<'_> {
    fn name(&self) -> &'static str {
        "hindsight-conv2d-bias-relu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(xs, xl, "conv2d_bias_relu input")?;
        let w = slice_f32(ws, wl, "conv2d_bias_relu weight")?;
        let (n, c, h, wd) = xl.shape().dims4()?;
        let (o, _, kh, kw) = wl.shape().dims4()?;
        let (ph, pw) = self.padding;
        let stride = self.stride;
        let ho = (h + 2 * ph - kh) / stride + 1;
        let wo = (wd + 2 * pw - kw) / stride + 1;
        let k = c * kh * kw;
        let (plane_in, plane_out) = (c * h * wd, o * ho * wo);
        let mut y = vec![0f32; n * plane_out];
        let direct = kh == 1 && kw == 1 && stride == 1 && ph == 0 && pw == 0;
        y.par_chunks_mut(plane_out)
            .zip(x.par_chunks(plane_in))
            .for_each(|(yb, xb)| {
                let weights = View::row_major(w, o, k);
                if direct {
                    sgemm(yb, false, weights, View::row_major(xb, c, h * wd));
                } else {
                    with_scratch(k * ho * wo, |cols| {
                        lower(
                            cols,
                            xb,
                            (c, h, wd),
                            (kh, kw),
                            stride,
                            self.padding,
                            (ho, wo),
                        );
                        sgemm(yb, false, weights, View::row_major(cols, k, ho * wo));
                    });
                }
                for (row, &b) in yb.chunks_exact_mut(ho * wo).zip(self.bias) {
                    row.iter_mut().for_each(|v| *v = (*v + b).max(0.0));
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((n, o, ho, wo))))
    }
}

/// im2col of one image `[C, H, W]` into `cols[C·kh·kw, Ho·Wo]`, zeros where the kernel reads
/// the padding.
fn lower(
    cols: &mut [f32],
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    (kh, kw): (usize, usize),
    stride: usize,
    (ph, pw): (usize, usize),
    (ho, wo): (usize, usize),
) {
    let mut rows = cols.chunks_exact_mut(ho * wo);
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for i in 0..kh {
            for j in 0..kw {
                let row = rows.next().expect("C·kh·kw rows");
                for oy in 0..ho {
                    let dst = &mut row[oy * wo..(oy + 1) * wo];
                    let iy = (oy * stride + i) as isize - ph as isize;
                    if iy < 0 || iy >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    if stride == 1 {
                        // Output columns whose input column ox + j − pw lies inside the row.
                        let lo = pw.saturating_sub(j).min(wo);
                        let hi = (w + pw).saturating_sub(j).min(wo).max(lo);
                        dst[..lo].fill(0.0);
                        dst[hi..].fill(0.0);
                        let start = lo + j - pw;
                        dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                    } else {
                        for (ox, d) in dst.iter_mut().enumerate() {
                            let ix = (ox * stride + j) as isize - pw as isize;
                            *d = if ix >= 0 && ix < w as isize {
                                src[ix as usize]
                            } else {
                                0.0
                            };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against candle's `conv2d` (padded input for asymmetric padding) + bias + ReLU.
    #[test]
    fn matches_candle_for_every_inception_shape() {
        let dev = Device::Cpu;
        let cases = [
            // (c, h, w, o, kh, kw, stride, ph, pw)
            (3, 11, 11, 4, 3, 3, 2, 0, 0),
            (4, 9, 9, 5, 3, 3, 1, 0, 0),
            (4, 9, 9, 5, 3, 3, 1, 1, 1),
            (6, 7, 7, 3, 1, 1, 1, 0, 0),
            (5, 8, 8, 4, 1, 7, 1, 0, 3),
            (5, 8, 8, 4, 7, 1, 1, 3, 0),
            (5, 8, 8, 4, 5, 5, 1, 2, 2),
            (3, 8, 8, 4, 1, 3, 1, 0, 1),
            (3, 8, 8, 4, 3, 1, 1, 1, 0),
            (3, 10, 10, 2, 3, 3, 2, 0, 0),
        ];
        for (c, h, w, o, kh, kw, s, ph, pw) in cases {
            let x = Tensor::randn(0f32, 1.0, (2, c, h, w), &dev).unwrap();
            let wt = Tensor::randn(0f32, 1.0, (o, c, kh, kw), &dev).unwrap();
            let bias: Vec<f32> = (0..o).map(|i| i as f32 * 0.1 - 0.2).collect();
            let got = conv2d_bias_relu(&x, &wt, &bias, s, (ph, pw)).unwrap();
            let padded = x
                .pad_with_zeros(2, ph, ph)
                .unwrap()
                .pad_with_zeros(3, pw, pw)
                .unwrap();
            let want = padded
                .conv2d(&wt, 0, s, 1, 1)
                .unwrap()
                .broadcast_add(&Tensor::from_vec(bias.clone(), (1, o, 1, 1), &dev).unwrap())
                .unwrap()
                .relu()
                .unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = (got - &want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                diff < 1e-4,
                "{c} {h} {w} {o} {kh}x{kw} s{s} p({ph},{pw}): {diff}"
            );
        }
    }
}
