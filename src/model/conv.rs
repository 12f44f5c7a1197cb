//! Stride-1 "same" convolution as one GEMM over an im2col buffer, with a backward pass that
//! is one more GEMM per operand and a col2im — candle's CPU convolution backward is a direct
//! loop. Only the im2col/col2im rearrangements are custom ops; the products are candle
//! matmuls, so autograd handles the weight gradient.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `x` [N, C, H, W] → columns [C·k·k, N·H·W] with zero padding k/2 (k odd).
struct Im2col {
    k: usize,
}

/// The adjoint of [`Im2col`]: columns [C·k·k, N·H·W] → [N, C, H, W], summing overlaps.
struct Col2im {
    k: usize,
    dims: (usize, usize, usize, usize),
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{what}: needs a contiguous f32 tensor"),
    }
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "hindsight-im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "im2col")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let k = self.k;
        let p = k / 2;
        let cols_per_row = n * h * w;
        let mut out = vec![0f32; c * k * k * cols_per_row];
        out.par_chunks_mut(cols_per_row)
            .enumerate()
            .for_each(|(row, dst)| {
                let (ci, dy, dx) = (row / (k * k), (row / k) % k, row % k);
                for b in 0..n {
                    let src = &x[(b * c + ci) * h * w..(b * c + ci + 1) * h * w];
                    for y in 0..h {
                        let sy = y as isize + dy as isize - p as isize;
                        if sy < 0 || sy >= h as isize {
                            continue;
                        }
                        let srow = &src[sy as usize * w..(sy as usize + 1) * w];
                        let drow = &mut dst[b * h * w + y * w..b * h * w + (y + 1) * w];
                        let shift = dx as isize - p as isize;
                        let (from, to) =
                            (shift.max(0) as usize, (w as isize + shift.min(0)) as usize);
                        let dfrom = (-shift).max(0) as usize;
                        drow[dfrom..dfrom + (to - from)].copy_from_slice(&srow[from..to]);
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((c * k * k, cols_per_row))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_res.contiguous()?.apply_op1_no_bwd(&Col2im {
            k: self.k,
            dims: arg.dims4()?,
        })?;
        Ok(Some(grad))
    }
}

impl CustomOp1 for Col2im {
    fn name(&self) -> &'static str {
        "hindsight-col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let cols = contiguous_f32(storage, layout, "col2im")?;
        let (n, c, h, w) = self.dims;
        let k = self.k;
        let p = k / 2;
        let cols_per_row = n * h * w;
        let mut out = vec![0f32; n * c * h * w];
        // One task per (image, channel) plane: each sums its k·k column rows.
        out.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(plane, dst)| {
                let (b, ci) = (plane / c, plane % c);
                for dy in 0..k {
                    for dx in 0..k {
                        let row = (ci * k + dy) * k + dx;
                        let src = &cols
                            [row * cols_per_row + b * h * w..row * cols_per_row + (b + 1) * h * w];
                        for y in 0..h {
                            let sy = y as isize + dy as isize - p as isize;
                            if sy < 0 || sy >= h as isize {
                                continue;
                            }
                            let shift = dx as isize - p as isize;
                            let (from, to) =
                                (shift.max(0) as usize, (w as isize + shift.min(0)) as usize);
                            let dfrom = (-shift).max(0) as usize;
                            let srow = &src[y * w + dfrom..y * w + dfrom + (to - from)];
                            let drow = &mut dst[sy as usize * w + from..sy as usize * w + to];
                            drow.iter_mut().zip(srow).for_each(|(d, s)| *d += s);
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }
}

/// `conv2d(x, w)` with stride 1 and padding k/2 for an odd square kernel, as
/// `w[O, C·k·k] · im2col(x)`; on devices other than the CPU, candle's own convolution.
pub fn conv2d_same(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let (o, ci, kh, kw) = w.dims4()?;
    if !x.device().is_cpu()
        || kh != kw
        || kh % 2 == 0
        || ci != c
        || x.dtype() != candle_core::DType::F32
    {
        return x.conv2d(w, kh / 2, 1, 1, 1);
    }
    let cols = if kh == 1 {
        // [N, C, H, W] → [C, N·H·W]: a transpose, no copies of windows.
        x.reshape((n, c, h * wd))?
            .transpose(0, 1)?
            .reshape((c, n * h * wd))?
    } else {
        x.contiguous()?.apply_op1(Im2col { k: kh })?
    };
    let y = w.reshape((o, c * kh * kw))?.matmul(&cols)?; // [O, N·H·W]
    y.reshape((o, n, h, wd))?.transpose(0, 1)?.contiguous()
}
