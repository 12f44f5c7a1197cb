//! Training data: a built-in procedural dataset that needs no download.
//!
//! Image `i` of the procedural set is drawn from an RNG seeded by (seed, i): a soft vertical
//! background gradient and one filled shape whose kind (disc, square, diamond, ring, cross)
//! and hue family are given by its class, with random position, size and shade. Pixels are in
//! [−1, 1] as EDM2 feeds its networks. The images have real structure (edges, flat regions,
//! class-dependent shape) at any resolution from 8 pixels up.

use rand::{Rng, SeedableRng};

/// Shape kinds, one per class modulo their number.
const KINDS: usize = 5;

/// The procedural dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Procedural {
    /// Image side in pixels.
    pub resolution: usize,
    /// Number of classes (0: unconditional, shapes of every kind).
    pub classes: usize,
    /// Seed of the whole set.
    pub seed: u64,
}

fn hsv(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h = h.rem_euclid(1.0) * 6.0;
    let c = v * s;
    let x = c * (1.0 - ((h % 2.0) - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

impl Procedural {
    /// Image `index` as CHW f32 in [−1, 1], and its class (0 when unconditional).
    pub fn image(&self, index: u64) -> (Vec<f32>, usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let class = if self.classes > 0 {
            rng.random_range(0..self.classes)
        } else {
            0
        };
        let kind = if self.classes > 0 {
            class % KINDS
        } else {
            rng.random_range(0..KINDS)
        };
        let hue = if self.classes > 0 {
            class as f32 / self.classes as f32 + rng.random_range(-0.04..0.04)
        } else {
            rng.random_range(0.0..1.0)
        };
        let fg = hsv(hue, rng.random_range(0.6..1.0), rng.random_range(0.7..1.0));
        let bg_top = hsv(rng.random_range(0.0..1.0), 0.3, rng.random_range(0.1..0.4));
        let bg_bottom = hsv(rng.random_range(0.0..1.0), 0.3, rng.random_range(0.1..0.4));
        let r = self.resolution as f32;
        let cx = rng.random_range(0.3..0.7) * r;
        let cy = rng.random_range(0.3..0.7) * r;
        let size = rng.random_range(0.18..0.32) * r;
        let n = self.resolution;
        let mut out = vec![0f32; 3 * n * n];
        for y in 0..n {
            let t = y as f32 / (n - 1).max(1) as f32;
            for x in 0..n {
                let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let inside = match kind {
                    0 => dx * dx + dy * dy <= size * size,
                    1 => dx.abs() <= size * 0.85 && dy.abs() <= size * 0.85,
                    2 => dx.abs() + dy.abs() <= size * 1.1,
                    3 => {
                        let d = (dx * dx + dy * dy).sqrt();
                        d <= size && d >= size * 0.55
                    }
                    _ => {
                        (dx.abs() <= size * 0.3 && dy.abs() <= size)
                            || (dy.abs() <= size * 0.3 && dx.abs() <= size)
                    }
                };
                for c in 0..3 {
                    let v = if inside {
                        fg[c]
                    } else {
                        bg_top[c] * (1.0 - t) + bg_bottom[c] * t
                    };
                    out[c * n * n + y * n + x] = v * 2.0 - 1.0;
                }
            }
        }
        (out, class)
    }
}
