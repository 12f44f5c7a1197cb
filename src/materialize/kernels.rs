//! Vector kernels of the weighted sum, compiled for several instruction sets and picked at
//! run time (`multiversion`); every path gives the same bits.

use multiversion::multiversion;

/// Inputs per group: a worker reads a group's chunks, then combines them block by block, so
/// each accumulator is loaded and stored once per group rather than once per input.
pub(super) const BATCH_INPUTS: usize = 8;
/// Elements combined at a time: a group's values (8 × 2 KiB) and one target's sums stay in
/// L1 cache while every input of the group is added in.
pub(super) const BLOCK: usize = 512;

/// Lanes per step of the combine kernels (one 512-bit register of f32).
const LANES: usize = 16;

/// The non-zero weights of a batch and their value rows (at most [`BATCH_INPUTS`]).
fn terms<'a, T: Copy + Default>(
    values: &'a [[f32; BLOCK]],
    w: &[f64],
    convert: impl Fn(f64) -> T,
) -> ([T; BATCH_INPUTS], [&'a [f32; BLOCK]; BATCH_INPUTS], usize) {
    let mut ws = [T::default(); BATCH_INPUTS];
    let mut vs = [&values[0]; BATCH_INPUTS];
    let mut n = 0;
    for (v, &w) in values.iter().zip(w) {
        if w != 0.0 {
            ws[n] = convert(w);
            vs[n] = v;
            n += 1;
        }
    }
    (ws, vs, n)
}

/// `acc = Σ_b w[b] · values[b]` over `acc.len()` elements, inputs with weight 0 skipped,
/// each element summed in input order (mul, then add: the same bits on every instruction
/// set). A register of sums takes the whole batch before it is stored once, instead of
/// a load and store of `acc` per input.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn combine_f32(acc: &mut [f32], values: &[[f32; BLOCK]], w: &[f64]) {
    let (ws, vs, n) = terms(values, w, |w| w as f32);
    let full = acc.len() / LANES * LANES;
    for (j, out) in acc[..full].chunks_exact_mut(LANES).enumerate() {
        let mut sum = [0f32; LANES];
        for t in 0..n {
            let v = &vs[t][j * LANES..(j + 1) * LANES];
            for (s, x) in sum.iter_mut().zip(v) {
                *s += ws[t] * *x;
            }
        }
        out.copy_from_slice(&sum);
    }
    for (i, out) in acc.iter_mut().enumerate().skip(full) {
        let mut sum = 0f32;
        for t in 0..n {
            sum += ws[t] * vs[t][i];
        }
        *out = sum;
    }
}

/// IEEE binary16 bits → f32, exactly as the F16C instruction converts (every value; NaNs
/// keep their payload and come out quiet). Branch-free, so each instruction-set version
/// is vectorised: `half`'s slice conversion calls its F16C routine once per 8 values.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, &h) in dst.iter_mut().zip(src) {
        *d = f16_bits_to_f32(h);
    }
}

/// One value of [`f16_to_f32`].
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let exp = h & 0x7c00;
    let man = h & 0x03ff;
    // Normal: rebias the exponent (15 → 127) and widen the mantissa.
    let normal = ((h & 0x7fff) << 13) + ((127 - 15) << 23);
    // Subnormal or zero: man · 2⁻²⁴, exact in f32 (no subnormal arithmetic involved).
    let small = (man as f32 * f32::from_bits(0x3380_0000)).to_bits();
    // Infinity or NaN (quieted).
    let special = 0x7f80_0000 | (man << 13) | if man != 0 { 0x0040_0000 } else { 0 };
    let bits = if exp == 0 {
        small
    } else if exp == 0x7c00 {
        special
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// [`combine_f32`] with f64 sums.
#[multiversion(targets("x86_64+avx512f+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn combine_f64(acc: &mut [f64], values: &[[f32; BLOCK]], w: &[f64]) {
    let (ws, vs, n) = terms(values, w, |w| w);
    const L: usize = LANES / 2;
    let full = acc.len() / L * L;
    for (j, out) in acc[..full].chunks_exact_mut(L).enumerate() {
        let mut sum = [0f64; L];
        for t in 0..n {
            let v = &vs[t][j * L..(j + 1) * L];
            for (s, x) in sum.iter_mut().zip(v) {
                *s += ws[t] * f64::from(*x);
            }
        }
        out.copy_from_slice(&sum);
    }
    for (i, out) in acc.iter_mut().enumerate().skip(full) {
        let mut sum = 0f64;
        for t in 0..n {
            sum += ws[t] * f64::from(vs[t][i]);
        }
        *out = sum;
    }
}
