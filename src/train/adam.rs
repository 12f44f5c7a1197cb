//! One Adam update of one parameter (no weight decay; non-finite gradients zeroed first, as
//! EDM2's `nan_to_num`), composed from candle ops for any device, and as one fused pass on the
//! CPU that gives the same bits.
//!
//! Composed, the update is about fifteen candle ops per parameter, each a pass over the
//! parameter with its own allocation, run one after another on one thread (4 ms of a 0.25 s
//! CPU training step). The fused kernel does the same f32 arithmetic in the same order per
//! element (candle's scalar ops round their f64 factors to f32 first, and so does it), so a
//! run trained on either path, or resumed on the other, is bitwise the same.

use candle_core::{Result, Storage, Tensor, Var};
use multiversion::multiversion;
use rayon::prelude::*;

/// The hyper-parameters of one step: `t` counts steps from 1.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamStep {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub lr: f64,
    pub t: i32,
}

/// The step's factors, rounded to f32 as candle's `affine` rounds them.
#[derive(Clone, Copy)]
struct Factors {
    b1: f32,
    one_minus_b1: f32,
    b2: f32,
    one_minus_b2: f32,
    inv_bias1: f32,
    inv_bias2: f32,
    eps: f32,
    lr: f32,
}

impl AdamStep {
    fn factors(&self) -> Factors {
        Factors {
            b1: self.beta1 as f32,
            one_minus_b1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            one_minus_b2: (1.0 - self.beta2) as f32,
            inv_bias1: (1.0 / (1.0 - self.beta1.powi(self.t))) as f32,
            inv_bias2: (1.0 / (1.0 - self.beta2.powi(self.t))) as f32,
            eps: self.eps as f32,
            lr: self.lr as f32,
        }
    }

    /// Updates `param` in place from its gradient `g` and returns the new moments `(m, v)`.
    pub(crate) fn apply(
        &self,
        param: &Var,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if let Some(done) = self.apply_cpu(param, g, m, v)? {
            return Ok(done);
        }
        self.apply_composed(param, g, m, v)
    }

    /// The update from candle ops (what other devices run; the definition the fused kernel is
    /// tested against).
    pub(crate) fn apply_composed(
        &self,
        param: &Var,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (b1, b2) = (self.beta1, self.beta2);
        let finite = g.abs()?.le(f32::MAX as f64)?;
        let g = finite.where_cond(g, &g.zeros_like()?)?;
        let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
        let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
        let m_hat = (&m / (1.0 - b1.powi(self.t)))?;
        let v_hat = (&v / (1.0 - b2.powi(self.t)))?;
        let update = (m_hat / (v_hat.sqrt()? + self.eps)?)?;
        param.set(&(param.as_tensor() - (update * self.lr)?)?)?;
        Ok((m, v))
    }

    /// The fused update for contiguous f32 tensors on the CPU; `None` where it does not apply.
    fn apply_cpu(
        &self,
        param: &Var,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let tensors = [param.as_tensor(), g, m, v];
        if tensors.iter().any(|t| {
            !t.device().is_cpu()
                || t.dtype() != candle_core::DType::F32
                || !t.is_contiguous()
                || t.shape() != param.shape()
        }) {
            return Ok(None);
        }
        let len = param.elem_count();
        let (mut p_new, mut m_new, mut v_new) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
        {
            let guards = tensors.map(|t| t.storage_and_layout());
            let mut slices = Vec::with_capacity(4);
            for (storage, layout) in &guards {
                let Storage::Cpu(cpu) = &**storage else {
                    return Ok(None);
                };
                let Some((start, end)) = layout.contiguous_offsets() else {
                    return Ok(None);
                };
                slices.push(&cpu.as_slice::<f32>()?[start..end]);
            }
            let f = self.factors();
            const CHUNK: usize = 1 << 14;
            p_new
                .par_chunks_mut(CHUNK)
                .zip(m_new.par_chunks_mut(CHUNK))
                .zip(v_new.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(i, ((po, mo), vo))| {
                    let at = i * CHUNK..i * CHUNK + po.len();
                    let [p, g, m, v] = [0, 1, 2, 3].map(|k| &slices[k][at.clone()]);
                    adam_chunk(f, (po, mo, vo), (p, g, m, v));
                });
        }
        let shape = param.shape().clone();
        param.set(&Tensor::from_vec(p_new, shape.clone(), param.device())?)?;
        Ok(Some((
            Tensor::from_vec(m_new, shape.clone(), m.device())?,
            Tensor::from_vec(v_new, shape, v.device())?,
        )))
    }
}

/// The update of one chunk, element by element in the composed version's order.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn adam_chunk(
    f: Factors,
    (po, mo, vo): (&mut [f32], &mut [f32], &mut [f32]),
    (p, g, m, v): (&[f32], &[f32], &[f32], &[f32]),
) {
    for i in 0..po.len().min(p.len()) {
        let g = if g[i].abs() <= f32::MAX { g[i] } else { 0.0 };
        let m = (m[i] * f.b1 + 0.0) + (g * f.one_minus_b1 + 0.0);
        let v = (v[i] * f.b2 + 0.0) + ((g * g) * f.one_minus_b2 + 0.0);
        let m_hat = m * f.inv_bias1 + 0.0;
        let v_hat = v * f.inv_bias2 + 0.0;
        let update = m_hat / (v_hat.sqrt() * 1.0 + f.eps);
        po[i] = p[i] - (update * f.lr + 0.0);
        mo[i] = m;
        vo[i] = v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The fused CPU update gives the composed one's bits, with NaN and infinite gradients
    /// among ordinary ones, over several steps (the moments carried along).
    #[test]
    fn fused_update_is_bitwise_the_composed_one() {
        let dev = Device::Cpu;
        let n = 40_000; // more than two chunks, and a ragged end
        let values = |seed: u64, scale: f32| -> Vec<f32> {
            (0..n as u64)
                .map(|i| {
                    let h = crate::model::formula::splitmix64(seed ^ i.wrapping_mul(0x9e37));
                    ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
                })
                .collect()
        };
        let start = Tensor::from_vec(values(1, 2.0), n, &dev).unwrap();
        let (pa, pb) = (
            Var::from_tensor(&start).unwrap(),
            Var::from_tensor(&start).unwrap(),
        );
        let zeros = Tensor::zeros(n, candle_core::DType::F32, &dev).unwrap();
        let (mut ma, mut va, mut mb, mut vb) = (zeros.clone(), zeros.clone(), zeros.clone(), zeros);
        for t in 1..=3 {
            let mut g = values(10 + t as u64, 0.3);
            g[7] = f32::NAN;
            g[1000] = f32::INFINITY;
            g[n - 1] = f32::NEG_INFINITY;
            let g = Tensor::from_vec(g, n, &dev).unwrap();
            let step = AdamStep {
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                lr: 0.01 / t as f64,
                t,
            };
            let fused = step
                .apply_cpu(&pa, &g, &ma, &va)
                .unwrap()
                .expect("fused path");
            (ma, va) = fused;
            (mb, vb) = step.apply_composed(&pb, &g, &mb, &vb).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            assert_eq!(
                bits(pa.as_tensor()),
                bits(pb.as_tensor()),
                "parameters, step {t}"
            );
            assert_eq!(bits(&ma), bits(&mb), "first moments, step {t}");
            assert_eq!(bits(&va), bits(&vb), "second moments, step {t}");
            assert!(pa
                .as_tensor()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|v| v.is_finite()));
        }
    }
}
