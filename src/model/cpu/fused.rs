//! Fused CPU kernels for the magnitude-preserving element-wise operations, the concatenation,
//! 2× resampling and the attention core, each with its own backward pass.
//!
//! Composed from candle ops, `normalize` is five passes forward and a dozen backward, a clamp
//! with scalar bounds broadcasts its bounds and builds masks, and every op's gradient starts
//! as a zero tensor that the contribution is added to. These kernels do one pass forward and
//! one or two backward; their loops are in [`super::kernels`], compiled per instruction set.
//! On other devices and dtypes the callers in `model::ops` use the composed versions (which
//! the parity tests also cover through the GPU check).

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernels;
use super::primitives::{sgemm, slice_f32, View};

/// Elements per parallel task of the point-wise kernels.
const CHUNK: usize = 1 << 15;

/// Splits the flat result of an op that computes two gradients in one sweep, `[∂a, ∂b]`, into
/// tensors of `a`'s and `b`'s shapes: views of it, no copy.
fn split_pair(both: &Tensor, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
    let (na, nb) = (a.elem_count(), b.elem_count());
    Ok((
        both.narrow(0, 0, na)?.reshape(a.shape())?,
        both.narrow(0, na, nb)?.reshape(b.shape())?,
    ))
}

/// Whether the fused kernels apply: a contiguous f32 tensor on the CPU.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// A point-wise function and its derivative.
pub trait Pointwise: Copy + Send + Sync + 'static {
    /// Op name for candle.
    const NAME: &'static str;
    /// Name of the gradient op.
    const GRAD_NAME: &'static str;
    /// The function.
    fn f(self, x: f32) -> f32;
    /// Its derivative.
    fn df(self, x: f32) -> f32;
    /// `y[i] = f(x[i])` over a chunk.
    fn map(self, y: &mut [f32], x: &[f32]) {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = self.f(x));
    }
    /// `o[i] = g[i] · f'(x[i])` over a chunk.
    fn map_grad(self, o: &mut [f32], x: &[f32], g: &[f32]) {
        for ((o, &x), &g) in o.iter_mut().zip(x).zip(g) {
            *o = g * self.df(x);
        }
    }
}

/// `silu(x) / 0.596`.
#[derive(Clone, Copy)]
pub struct MpSilu;

impl Pointwise for MpSilu {
    const NAME: &'static str = "hindsight-mp-silu";
    const GRAD_NAME: &'static str = "hindsight-mp-silu-grad";
    #[inline]
    fn f(self, x: f32) -> f32 {
        kernels::mp_silu(x)
    }
    #[inline]
    fn df(self, x: f32) -> f32 {
        kernels::mp_silu_grad(x)
    }
    fn map(self, y: &mut [f32], x: &[f32]) {
        kernels::mp_silu_map(y, x);
    }
    fn map_grad(self, o: &mut [f32], x: &[f32], g: &[f32]) {
        kernels::mp_silu_backward(o, x, g);
    }
}

/// `clamp(x, −c, c)`; the gradient passes where `|x| ≤ c`.
#[derive(Clone, Copy)]
pub struct Clip(pub f32);

impl Pointwise for Clip {
    const NAME: &'static str = "hindsight-clip";
    const GRAD_NAME: &'static str = "hindsight-clip-grad";
    #[inline]
    fn f(self, x: f32) -> f32 {
        x.clamp(-self.0, self.0)
    }
    #[inline]
    fn df(self, x: f32) -> f32 {
        if x.abs() <= self.0 {
            1.0
        } else {
            0.0
        }
    }
}

/// Applies a [`Pointwise`] function as a candle op with a backward pass.
pub struct Map<P>(pub P);

struct MapGrad<P>(P);

impl<P: Pointwise> CustomOp1 for Map<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(storage, layout, P::NAME)?;
        let mut y = vec![0f32; x.len()];
        let p = self.0;
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(|(y, x)| p.map(y, x));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            arg.apply_op2_no_bwd(&grad.contiguous()?, &MapGrad(self.0))?,
        ))
    }
}

impl<P: Pointwise> CustomOp2 for MapGrad<P> {
    fn name(&self) -> &'static str {
        P::GRAD_NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(s1, l1, P::GRAD_NAME)?;
        let g = slice_f32(s2, l2, P::GRAD_NAME)?;
        if x.len() != g.len() {
            candle_core::bail!("{}: shapes differ", P::GRAD_NAME);
        }
        let mut out = vec![0f32; x.len()];
        let p = self.0;
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(g.par_chunks(CHUNK)))
            .for_each(|(o, (x, g))| p.map_grad(o, x, g));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `wa·a + wb·b` for tensors of one shape (the magnitude-preserving sum).
pub struct LinComb {
    /// Weight of the first operand.
    pub wa: f32,
    /// Weight of the second operand.
    pub wb: f32,
    /// Clamp the sum to `[−c, c]` (EDM2's activation clipping after a block's last sum; the
    /// gradient passes where the sum lies within): one pass and one graph node instead of two.
    pub clip: Option<f32>,
}

/// Both gradients of a clipped [`LinComb`] in one sweep: arguments `∂out`, `a`, `b`; result
/// the flat concatenation `[∂a, ∂b]`, split by the backward pass into views.
struct LinCombClipGrad(LinComb);

impl CustomOp2 for LinComb {
    fn name(&self) -> &'static str {
        "hindsight-lincomb"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = slice_f32(s1, l1, "mp_sum")?;
        let b = slice_f32(s2, l2, "mp_sum")?;
        if l1.shape() != l2.shape() {
            candle_core::bail!("mp_sum: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let mut out = vec![0f32; a.len()];
        let (wa, wb) = (self.wa, self.wb);
        let c = self.clip.unwrap_or(f32::INFINITY);
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| kernels::lincomb_clip(o, a, b, wa, wb, c));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        if self.clip.is_some() {
            let op = LinCombClipGrad(LinComb { ..*self });
            let both = grad.apply_op3_no_bwd(&a.contiguous()?, &b.contiguous()?, &op)?;
            let (ga, gb) = split_pair(&both, a, b)?;
            return Ok((Some(ga), Some(gb)));
        }
        let channels = grad.dims().get(1).copied().unwrap_or(1);
        let part = |scale: f32| ScaledSlice {
            start: 0,
            len: channels,
            scale,
        };
        Ok((
            Some(grad.apply_op1_no_bwd(&part(self.wa))?),
            Some(grad.apply_op1_no_bwd(&part(self.wb))?),
        ))
    }
}

impl candle_core::CustomOp3 for LinCombClipGrad {
    fn name(&self) -> &'static str {
        "hindsight-lincomb-clip-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = slice_f32(s1, l1, "mp_sum grad")?;
        let a = slice_f32(s2, l2, "mp_sum grad")?;
        let b = slice_f32(s3, l3, "mp_sum grad")?;
        if a.len() != g.len() || b.len() != g.len() {
            candle_core::bail!("mp_sum grad: shapes differ");
        }
        let LinComb { wa, wb, clip } = self.0;
        let c = clip.unwrap_or(f32::INFINITY);
        let mut out = vec![0f32; 2 * g.len()];
        let (ga, gb) = out.split_at_mut(g.len());
        ga.par_chunks_mut(CHUNK)
            .zip(gb.par_chunks_mut(CHUNK))
            .zip(
                g.par_chunks(CHUNK)
                    .zip(a.par_chunks(CHUNK))
                    .zip(b.par_chunks(CHUNK)),
            )
            .for_each(|((ga, gb), ((g, a), b))| {
                kernels::lincomb_clip_backward((ga, gb), g, a, b, wa, wb, c)
            });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// `scale · x[:, start..start + len]` for a contiguous tensor (a scalar times the whole
/// tensor when the range covers dimension 1, or for tensors of rank < 2), in parallel: the
/// backward passes of [`LinComb`] and [`ScaledCat`]. (candle's `affine` runs on one thread,
/// and on a narrowed view it copies strided.)
#[derive(Clone, Copy)]
pub struct ScaledSlice {
    /// First index of dimension 1 kept.
    pub start: usize,
    /// How many are kept.
    pub len: usize,
    /// The factor.
    pub scale: f32,
}

impl CustomOp1 for ScaledSlice {
    fn name(&self) -> &'static str {
        "hindsight-scaled-slice"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(storage, layout, "scaled slice")?;
        let dims = layout.shape().dims();
        let s = self.scale;
        if dims.len() < 2 {
            let mut y = vec![0f32; x.len()];
            y.par_chunks_mut(CHUNK)
                .zip(x.par_chunks(CHUNK))
                .for_each(|(y, x)| kernels::scale(y, x, s));
            return Ok((CpuStorage::F32(y), layout.shape().clone()));
        }
        if self.start + self.len > dims[1] {
            candle_core::bail!(
                "scaled slice: {}..{} outside dimension 1 of {dims:?}",
                self.start,
                self.start + self.len
            );
        }
        let inner: usize = dims[2..].iter().product();
        let (from, width, row) = (self.start * inner, self.len * inner, dims[1] * inner);
        let mut y = vec![0f32; dims[0] * width];
        if width > 0 {
            y.par_chunks_mut(width)
                .zip(x.par_chunks(row))
                .for_each(|(y, x)| kernels::scale(y, &x[from..from + width], s));
        }
        let mut out = dims.to_vec();
        out[1] = self.len;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }
}

/// `cat([wa·a, wb·b], dim 1)` for tensors that differ only in dimension 1 (the
/// magnitude-preserving concatenation): one pass forward instead of two scalings and a copy,
/// and one graph node instead of three.
pub struct ScaledCat {
    /// Weight of the first operand.
    pub wa: f32,
    /// Weight of the second operand.
    pub wb: f32,
}

impl CustomOp2 for ScaledCat {
    fn name(&self) -> &'static str {
        "hindsight-scaled-cat"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = slice_f32(s1, l1, "mp_cat")?;
        let b = slice_f32(s2, l2, "mp_cat")?;
        let (da, db) = (l1.shape().dims(), l2.shape().dims());
        if da.len() < 2 || da.len() != db.len() || da[0] != db[0] || da[2..] != db[2..] {
            candle_core::bail!("mp_cat: shapes {da:?} and {db:?} differ outside dimension 1");
        }
        let (n, inner) = (da[0], da[2..].iter().product::<usize>());
        let (ca, cb) = (da[1] * inner, db[1] * inner);
        let mut out = vec![0f32; n * (ca + cb)];
        let (wa, wb) = (self.wa, self.wb);
        out.par_chunks_mut(ca + cb)
            .zip(a.par_chunks(ca.max(1)).zip(b.par_chunks(cb.max(1))))
            .for_each(|(o, (a, b))| {
                let (oa, ob) = o.split_at_mut(ca);
                kernels::scale(oa, a, wa);
                kernels::scale(ob, b, wb);
            });
        let mut dims = da.to_vec();
        dims[1] += db[1];
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ca, cb) = (a.dim(1)?, b.dim(1)?);
        let grad = grad.contiguous()?;
        let part = |start, len, scale| ScaledSlice { start, len, scale };
        Ok((
            Some(grad.apply_op1_no_bwd(&part(0, ca, self.wa))?),
            Some(grad.apply_op1_no_bwd(&part(ca, cb, self.wb))?),
        ))
    }
}

/// `x / (ε + ‖x‖/√M)` over the middle axis of a contiguous tensor viewed as
/// `[outer, M, inner]` (EDM2's `normalize` over a contiguous range of dimensions).
#[derive(Clone, Copy)]
pub struct Normalize {
    /// Product of the dimensions before the normalised ones.
    pub outer: usize,
    /// Product of the normalised dimensions.
    pub mid: usize,
    /// Product of the dimensions after them.
    pub inner: usize,
    /// ε.
    pub eps: f32,
}

struct NormalizeGrad(Normalize);

impl Normalize {
    fn check(&self, len: usize) -> Result<()> {
        if self.outer * self.mid * self.inner != len {
            candle_core::bail!("normalize: layout does not match {len} elements");
        }
        Ok(())
    }
}

/// Per-task buffers of [`Normalize`]'s slice passes (`inner` long each).
struct NormScratch {
    n2: Vec<f64>,
    gx: Vec<f64>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Normalize {
    fn scratch(&self) -> NormScratch {
        NormScratch {
            n2: vec![0f64; self.inner],
            gx: vec![0f64; self.inner],
            a: vec![0f32; self.inner],
            b: vec![0f32; self.inner],
        }
    }

    /// `y = x / (ε + ‖x‖/√M)` for one `[mid, inner]` slice.
    fn slice_forward(&self, y: &mut [f32], x: &[f32], sc: &mut NormScratch) {
        let scale = 1.0 / (self.mid as f64).sqrt();
        let eps = f64::from(self.eps);
        kernels::sum_squares(x, &mut sc.n2);
        for (d, s) in sc.a.iter_mut().zip(sc.n2.iter()) {
            *d = (1.0 / (eps + s.sqrt() * scale)) as f32;
        }
        kernels::scale_rows(y, x, &sc.a);
    }

    /// The backward pass of one slice: with `n = ‖x‖`, `d = ε + n/√M`,
    /// `∂x_m = g_m/d − x_m · (Σ_j g_j x_j) / (d² · n · √M)`.
    fn slice_backward(&self, o: &mut [f32], x: &[f32], g: &[f32], sc: &mut NormScratch) {
        let root_m = (self.mid as f64).sqrt();
        let eps = f64::from(self.eps);
        kernels::sum_squares(x, &mut sc.n2);
        kernels::sum_products(x, g, &mut sc.gx);
        // a = 1/d, b = (Σ g·x) / (d²·n·√M) (0 where x is all zeros).
        for (((a, b), &n2), &gx) in
            sc.a.iter_mut()
                .zip(sc.b.iter_mut())
                .zip(sc.n2.iter())
                .zip(sc.gx.iter())
        {
            let n = n2.sqrt();
            let inv_d = 1.0 / (eps + n / root_m);
            *b = if n > 0.0 {
                (gx * inv_d * inv_d / (n * root_m)) as f32
            } else {
                0.0
            };
            *a = inv_d as f32;
        }
        kernels::normalize_backward_rows(o, x, g, &sc.a, &sc.b);
    }
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "hindsight-normalize"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(storage, layout, "normalize")?;
        self.check(x.len())?;
        let slice = self.mid * self.inner;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(slice)
            .zip(x.par_chunks(slice))
            .for_each_init(|| self.scratch(), |sc, (y, x)| self.slice_forward(y, x, sc));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &NormalizeGrad(*self),
        )?))
    }
}

impl CustomOp2 for NormalizeGrad {
    fn name(&self) -> &'static str {
        "hindsight-normalize-grad"
    }

    /// See [`Normalize::slice_backward`].
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        let x = slice_f32(s1, l1, "normalize grad")?;
        let g = slice_f32(s2, l2, "normalize grad")?;
        p.check(x.len())?;
        p.check(g.len())?;
        let slice = p.mid * p.inner;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(slice)
            .zip(x.par_chunks(slice).zip(g.par_chunks(slice)))
            .for_each_init(
                || p.scratch(),
                |sc, (o, (x, g))| p.slice_backward(o, x, g, sc),
            );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension of a contiguous tensor (rows of `row` elements).
#[derive(Clone, Copy)]
pub struct Softmax {
    /// Length of the last dimension.
    pub row: usize,
}

struct SoftmaxGrad(Softmax);

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "hindsight-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(storage, layout, "softmax")?;
        let row = self.row;
        if row == 0 || x.len() % row != 0 {
            candle_core::bail!("softmax: rows of {row} do not tile {} elements", x.len());
        }
        let mut y = vec![0f32; x.len()];
        let rows_per_task = (CHUNK / row).max(1) * row;
        y.par_chunks_mut(rows_per_task)
            .zip(x.par_chunks(rows_per_task))
            .for_each(|(y, x)| {
                y.copy_from_slice(x);
                kernels::softmax_rows(y, row, 1.0);
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(
            &grad.contiguous()?,
            &SoftmaxGrad(*self),
        )?))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "hindsight-softmax-grad"
    }

    /// `∂x = y ⊙ (g − Σ g·y)` per row, from the softmax output `y` and its gradient `g`.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = slice_f32(s1, l1, "softmax grad")?;
        let g = slice_f32(s2, l2, "softmax grad")?;
        let row = self.0.row;
        if y.len() != g.len() || row == 0 || y.len() % row != 0 {
            candle_core::bail!("softmax grad: shapes differ");
        }
        let mut out = vec![0f32; y.len()];
        let rows_per_task = (CHUNK / row).max(1) * row;
        out.par_chunks_mut(rows_per_task)
            .zip(y.par_chunks(rows_per_task).zip(g.par_chunks(rows_per_task)))
            .for_each(|(o, (y, g))| kernels::softmax_rows_backward(o, Some(g), y, row, 1.0));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `mp_silu(y · c)` for `y` [N, C, H, W] and a per-channel scale `c` [N, C] (EDM2's embedding
/// modulation followed by its activation), with the gradients of both.
pub struct ModSilu;

/// Both gradients of [`ModSilu`] in one sweep: arguments `y`, `c`, `g`; result the flat
/// concatenation `[∂y (N·C·H·W values), ∂c (N·C values)]`, which the backward pass splits
/// into two views without copying.
struct ModSiluGrad;

/// The arguments of the [`ModSilu`] gradient ops, checked.
struct ModGradArgs<'a> {
    y: &'a [f32],
    c: &'a [f32],
    g: &'a [f32],
    /// H·W.
    plane: usize,
}

impl<'a> ModGradArgs<'a> {
    fn new(
        (s1, l1): (&'a CpuStorage, &Layout),
        (s2, l2): (&'a CpuStorage, &Layout),
        (s3, l3): (&'a CpuStorage, &Layout),
    ) -> Result<Self> {
        let y = slice_f32(s1, l1, "modulation grad")?;
        let c = slice_f32(s2, l2, "modulation grad")?;
        let g = slice_f32(s3, l3, "modulation grad")?;
        let (_, plane) = mod_dims(l1, l2)?;
        if g.len() != y.len() {
            candle_core::bail!("modulation grad: shapes differ");
        }
        Ok(Self { y, c, g, plane })
    }
}

/// (planes N·C, plane size H·W) of `y` and `c`'s shapes, checked.
fn mod_dims(y: &Layout, c: &Layout) -> Result<(usize, usize)> {
    let (n, ch, h, w) = y.shape().dims4()?;
    let (cn, cc) = c.shape().dims2()?;
    if (cn, cc) != (n, ch) {
        candle_core::bail!("modulation: scale {:?} for {:?}", c.shape(), y.shape());
    }
    Ok((n * ch, h * w))
}

impl CustomOp2 for ModSilu {
    fn name(&self) -> &'static str {
        "hindsight-mod-silu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = slice_f32(s1, l1, "modulation")?;
        let c = slice_f32(s2, l2, "modulation scale")?;
        let (_, plane) = mod_dims(l1, l2)?;
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(plane)
            .zip(y.par_chunks(plane).zip(c.par_iter()))
            .for_each(|(o, (y, &c))| kernels::mod_silu_plane(o, y, c));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let both = y.apply_op3_no_bwd(c, &grad, &ModSiluGrad)?;
        let (gy, gc) = split_pair(&both, y, c)?;
        Ok((Some(gy), Some(gc)))
    }
}

impl candle_core::CustomOp3 for ModSiluGrad {
    fn name(&self) -> &'static str {
        "hindsight-mod-silu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ModGradArgs { y, c, g, plane } = ModGradArgs::new((s1, l1), (s2, l2), (s3, l3))?;
        let mut out = vec![0f32; y.len() + c.len()];
        let (gy, gc) = out.split_at_mut(y.len());
        gy.par_chunks_mut(plane)
            .zip(gc.par_iter_mut())
            .zip(
                y.par_chunks(plane)
                    .zip(g.par_chunks(plane))
                    .zip(c.par_iter()),
            )
            .for_each(|((gy, gc), ((y, g), &c))| {
                *gc = kernels::mod_silu_plane_backward(gy, y, g, c);
            });
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// 2× resampling of NCHW planes with the [1, 1] filter, times `scale`: `up` repeats every
/// pixel into a 2×2 block (nearest neighbour), otherwise each 2×2 block is summed (times ¼:
/// average pooling). Each is the other's transpose, so the backward pass of `{up, s}` is
/// `{!up, s}` applied to the gradient.
#[derive(Clone, Copy)]
pub struct Resample2 {
    /// Upsample (else downsample).
    pub up: bool,
    /// Factor applied to the result.
    pub scale: f32,
    /// Input height and width.
    pub h: usize,
    /// Input width.
    pub w: usize,
}

impl CustomOp1 for Resample2 {
    fn name(&self) -> &'static str {
        if self.up {
            "hindsight-upsample2"
        } else {
            "hindsight-downsample2"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice_f32(storage, layout, self.name())?;
        let dims = layout.shape().dims();
        let (h, w) = (self.h, self.w);
        if dims.len() != 4
            || dims[2] != h
            || dims[3] != w
            || (!self.up && (h % 2 != 0 || w % 2 != 0))
        {
            candle_core::bail!("{}: unexpected input shape {dims:?}", self.name());
        }
        let (oh, ow) = if self.up {
            (2 * h, 2 * w)
        } else {
            (h / 2, w / 2)
        };
        let planes = dims[0] * dims[1];
        let mut y = vec![0f32; planes * oh * ow];
        let s = self.scale;
        y.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(y, x)| {
                if self.up {
                    for (r, row) in y.chunks_exact_mut(ow).enumerate() {
                        let src = &x[(r / 2) * w..(r / 2 + 1) * w];
                        for (pair, &v) in row.chunks_exact_mut(2).zip(src) {
                            pair[0] = v * s;
                            pair[1] = v * s;
                        }
                    }
                } else {
                    for (r, row) in y.chunks_exact_mut(ow).enumerate() {
                        let top = &x[2 * r * w..(2 * r + 1) * w];
                        let bottom = &x[(2 * r + 1) * w..(2 * r + 2) * w];
                        for ((v, t), b) in row
                            .iter_mut()
                            .zip(top.chunks_exact(2))
                            .zip(bottom.chunks_exact(2))
                        {
                            *v = (t[0] + t[1] + b[0] + b[1]) * s;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(y), Shape::from((dims[0], dims[1], oh, ow))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (oh, ow) = if self.up {
            (2 * self.h, 2 * self.w)
        } else {
            (self.h / 2, self.w / 2)
        };
        let back = Resample2 {
            up: !self.up,
            scale: self.scale,
            h: oh,
            w: ow,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

/// The core of EDM2's self-attention for one tensor `y` [N, heads, d, 3, T] holding the
/// (normalised) queries, keys and values side by side: per image and head,
/// `W = softmax(s · QᵀK)` over keys and `O = V Wᵀ`, giving [N, heads, d, T]; `s` is 1/√d.
/// One graph node with its own backward (recomputing `W`), instead of three strided copies,
/// a scaling, two products and a softmax, each with candle's gradient bookkeeping.
#[derive(Clone, Copy)]
pub struct Attention {
    /// Channels per head.
    pub d: usize,
    /// Positions (H·W).
    pub t: usize,
    /// The scale `s` of the scores.
    pub scale: f32,
}

struct AttentionGrad(Attention);

impl Attention {
    fn check(&self, layout: &Layout) -> Result<usize> {
        let dims = layout.shape().dims();
        if dims.len() != 5 || dims[2] != self.d || dims[3] != 3 || dims[4] != self.t {
            candle_core::bail!(
                "attention: expected [N, heads, {}, 3, {}], got {dims:?}",
                self.d,
                self.t
            );
        }
        Ok(dims[0] * dims[1])
    }

    /// Views of Q, K and V [d, T] inside one head's block of `y`.
    fn qkv<'a>(&self, y: &'a [f32]) -> [View<'a>; 3] {
        let t = self.t;
        [0, 1, 2].map(|j| View {
            data: &y[j * t..],
            rows: self.d,
            cols: t,
            rs: 3 * t,
            cs: 1,
        })
    }

    /// `W = softmax(s · QᵀK)` [T, T] into `w`.
    fn weights(&self, q: View<'_>, k: View<'_>, w: &mut [f32]) {
        sgemm(w, false, q.t(), k);
        kernels::softmax_rows(w, self.t, self.scale);
    }

    /// One head: `o` [d, T] from its block `y` [d, 3, T]; `w` is [T, T] scratch.
    fn block(&self, o: &mut [f32], y: &[f32], w: &mut [f32]) {
        let [q, k, v] = self.qkv(y);
        self.weights(q, k, w);
        sgemm(o, false, v, View::row_major(w, self.t, self.t).t());
    }

    /// A backward pass head by head, in parallel: the input `y` (blocks [d, 3, T]) and the
    /// output's gradient `g` (blocks [d, T]) checked against each other, and `f(scratch, gy, y,
    /// g)` run per block with a scratch from `init` per task; returns the input's gradient.
    fn heads_backward<S>(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        init: impl Fn() -> S + Sync + Send,
        f: impl Fn(&mut S, &mut [f32], &[f32], &[f32]) + Sync + Send,
    ) -> Result<Vec<f32>> {
        let y = slice_f32(s1, l1, "attention")?;
        let g = slice_f32(s2, l2, "attention gradient")?;
        let (d, t) = (self.d, self.t);
        if g.len() * 3 != y.len() {
            candle_core::bail!(
                "attention gradient: {} values for {} inputs",
                g.len(),
                y.len()
            );
        }
        let mut gy = vec![0f32; y.len()];
        gy.par_chunks_mut(3 * d * t)
            .zip(y.par_chunks(3 * d * t).zip(g.par_chunks(d * t)))
            .for_each_init(init, |sc, (gy, (y, g))| f(sc, gy, y, g));
        Ok(gy)
    }

    /// Scratch of [`Self::block_backward`]: W, ∂W and one [d, T] part.
    fn grad_scratch(&self) -> [Vec<f32>; 3] {
        let (d, t) = (self.d, self.t);
        [vec![0f32; t * t], vec![0f32; t * t], vec![0f32; d * t]]
    }

    /// One head's backward pass: `gy` [d, 3, T] from its block `y` and the output's gradient
    /// `g` [d, T]. With `G` = ∂O: ∂V = G W, ∂W = Gᵀ V, ∂S = s · W ⊙ (∂W − rowsum(∂W ⊙ W)),
    /// ∂Q = K ∂Sᵀ, ∂K = Q ∂S.
    fn block_backward(&self, gy: &mut [f32], y: &[f32], g: &[f32], sc: &mut [Vec<f32>; 3]) {
        let (d, t) = (self.d, self.t);
        let [w, dw, part] = sc;
        let [q, k, v] = self.qkv(y);
        self.weights(q, k, w);
        let gv = View::row_major(g, d, t);
        let wv = View::row_major(w, t, t);
        // ∂W and then ∂S in place.
        sgemm(dw, false, gv.t(), v);
        kernels::softmax_rows_backward(dw, None, w, t, self.scale);
        let ds = View::row_major(dw, t, t);
        let mut put = |j: usize, part: &[f32]| {
            for (c, src) in part.chunks_exact(t).enumerate() {
                gy[c * 3 * t + j * t..c * 3 * t + (j + 1) * t].copy_from_slice(src);
            }
        };
        sgemm(part, false, k, ds.t());
        put(0, part);
        sgemm(part, false, q, ds);
        put(1, part);
        sgemm(part, false, gv, wv);
        put(2, part);
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "hindsight-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = slice_f32(storage, layout, "attention")?;
        self.check(layout)?;
        let (d, t) = (self.d, self.t);
        let mut out = vec![0f32; y.len() / 3];
        out.par_chunks_mut(d * t)
            .zip(y.par_chunks(3 * d * t))
            .for_each_init(|| vec![0f32; t * t], |w, (o, y)| self.block(o, y, w));
        let dims = layout.shape().dims();
        Ok((CpuStorage::F32(out), Shape::from((dims[0], dims[1], d, t))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &AttentionGrad(*self),
        )?))
    }
}

impl CustomOp2 for AttentionGrad {
    fn name(&self) -> &'static str {
        "hindsight-attention-grad"
    }

    /// See [`Attention::block_backward`].
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let a = self.0;
        a.check(l1)?;
        let gy = a.heads_backward(
            (s1, l1),
            (s2, l2),
            || a.grad_scratch(),
            |sc, gy, y, g| a.block_backward(gy, y, g, sc),
        )?;
        Ok((CpuStorage::F32(gy), l1.shape().clone()))
    }
}

/// EDM2's attention from the `qkv` convolution's output `y` [N, 3C, H, W] to [N, C, H, W]:
/// per image and head, the block [d, 3, T] (`d = C / heads`, `T = H·W`) normalised over `d`,
/// then [`Attention`]. One graph node with its own backward (recomputing the normalised block
/// and the weights) where the composed form has a reshape, the normalisation, the attention
/// core and a reshape back — four nodes, each with its gradient to accumulate.
#[derive(Clone, Copy)]
pub struct AttentionNorm {
    /// The core.
    pub attention: Attention,
    /// ε of the normalisation.
    pub eps: f32,
}

struct AttentionNormGrad(AttentionNorm);

impl AttentionNorm {
    fn norm(&self) -> Normalize {
        let a = self.attention;
        Normalize {
            outer: 1,
            mid: a.d,
            inner: 3 * a.t,
            eps: self.eps,
        }
    }

    /// Output channels C, checked against `layout` [N, 3C, H, W].
    fn check(&self, layout: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (n, c3, h, w) = layout.shape().dims4()?;
        let a = self.attention;
        if h * w != a.t || c3 % (3 * a.d) != 0 {
            candle_core::bail!(
                "attention: [N, 3C, H, W] with H·W = {} and C a multiple of {}, got {:?}",
                a.t,
                a.d,
                layout.shape()
            );
        }
        Ok((n, c3 / 3, h, w))
    }
}

impl CustomOp1 for AttentionNorm {
    fn name(&self) -> &'static str {
        "hindsight-attention-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = slice_f32(storage, layout, "attention")?;
        let (n, c, h, w) = self.check(layout)?;
        let (a, norm) = (self.attention, self.norm());
        let (d, t) = (a.d, a.t);
        let mut out = vec![0f32; y.len() / 3];
        out.par_chunks_mut(d * t)
            .zip(y.par_chunks(3 * d * t))
            .for_each_init(
                || (vec![0f32; t * t], vec![0f32; 3 * d * t], norm.scratch()),
                |(wts, yn, sc), (o, y)| {
                    norm.slice_forward(yn, y, sc);
                    a.block(o, yn, wts);
                },
            );
        Ok((CpuStorage::F32(out), Shape::from((n, c, h, w))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad.contiguous()?,
            &AttentionNormGrad(*self),
        )?))
    }
}

impl CustomOp2 for AttentionNormGrad {
    fn name(&self) -> &'static str {
        "hindsight-attention-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let p = self.0;
        p.check(l1)?;
        let (a, norm) = (p.attention, p.norm());
        let block = 3 * a.d * a.t;
        let gy = a.heads_backward(
            (s1, l1),
            (s2, l2),
            || {
                let blocks = (vec![0f32; block], vec![0f32; block]);
                (blocks, a.grad_scratch(), norm.scratch())
            },
            |((yn, gyn), asc, nsc), gy, y, g| {
                norm.slice_forward(yn, y, nsc);
                a.block_backward(gyn, yn, g, asc);
                norm.slice_backward(gy, y, gyn, nsc);
            },
        )?;
        Ok((CpuStorage::F32(gy), l1.shape().clone()))
    }
}
