//! The FID feature network: Inception-v3 as TensorFlow's `inception-2015-12-05` graph computes
//! it (the network behind every published FID, EDM2's included), to its 2048-d `pool3`
//! features, in candle (inference only).
//!
//! Architecture (Szegedy et al., "Rethinking the Inception Architecture", arXiv 1512.00567, as
//! the 2015-12-05 graph has it): every convolution is followed by batch normalisation
//! (ε = 0.001) and ReLU; the blocks' average pools exclude padding; the last block's pool
//! branch takes a max, not an average (pytorch-fid's `FIDInceptionE_2`); features are the 8×8
//! average pool of the last block. Layer names follow pytorch-fid's `FIDInceptionA/C/E`
//! (`Mixed_5b.branch1x1.conv.weight`, …); the TorchScript port's names are mapped to them when
//! loading (see `weights`). Batch normalisation is folded into each convolution's weights and
//! bias once, at load time.
//!
//! Preprocessing differs between the two reference pipelines and is part of the weights'
//! [`Preprocess`]: EDM2 / StyleGAN (NVIDIA's detector) resize with TensorFlow's legacy
//! bilinear rule and scale pixels as `(x − 128) / 128`; pytorch-fid resizes with PyTorch's
//! half-pixel bilinear rule and scales as `2·x/255 − 1`.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Side of the network's input.
pub const INPUT_SIZE: usize = 299;
/// Width of its features.
pub const FEATURES: usize = 2048;

/// How pixels (0–255) become the network's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    /// NVIDIA's detector (EDM2, StyleGAN's metrics): TensorFlow's legacy bilinear resize
    /// (output pixel `j` samples input position `j · in / 299`, edges clamped), then
    /// `(x − 128) / 128`.
    Nvidia,
    /// pytorch-fid: bilinear resize with half-pixel centres (`align_corners=False`: position
    /// `(j + ½) · in / 299 − ½`, edges clamped), then `2 · x / 255 − 1`.
    PytorchFid,
}

impl Preprocess {
    /// Input position sampled by output pixel `j` of `out`, from `len` input pixels, and the
    /// two neighbours with the second one's weight.
    fn taps(self, j: usize, len: usize, out: usize) -> (usize, usize, f32) {
        let scale = len as f64 / out as f64;
        let pos = match self {
            Preprocess::Nvidia => j as f64 * scale,
            Preprocess::PytorchFid => ((j as f64 + 0.5) * scale - 0.5).max(0.0),
        };
        let i0 = (pos.floor() as usize).min(len - 1);
        let i1 = (i0 + 1).min(len - 1);
        (i0, i1, (pos - i0 as f64) as f32)
    }

    fn scale(self, v: f32) -> f32 {
        match self {
            Preprocess::Nvidia => (v - 128.0) / 128.0,
            Preprocess::PytorchFid => v / 255.0 * 2.0 - 1.0,
        }
    }

    /// Images `[N, C, H, W]` of pixels (0–255, `C` 1 or 3; grey is replicated) to the
    /// network's input `[N, 3, 299, 299]`: resized (when not 299×299) and scaled.
    pub fn apply(self, images: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        let s = INPUT_SIZE;
        let rows: Vec<(usize, usize, f32)> = (0..s).map(|j| self.taps(j, h, s)).collect();
        let cols: Vec<(usize, usize, f32)> = (0..s).map(|j| self.taps(j, w, s)).collect();
        let same = h == s && w == s;
        let mut out = vec![0f32; n * 3 * s * s];
        for (img, dst) in images
            .chunks_exact(c * h * w)
            .zip(out.chunks_exact_mut(3 * s * s))
        {
            for ch in 0..3 {
                let src = &img[(ch % c) * h * w..(ch % c + 1) * h * w];
                let plane = &mut dst[ch * s * s..(ch + 1) * s * s];
                for (y, &(r0, r1, fy)) in rows.iter().enumerate() {
                    for (x, &(c0, c1, fx)) in cols.iter().enumerate() {
                        let v = if same {
                            src[y * w + x]
                        } else {
                            let top = src[r0 * w + c0] + (src[r0 * w + c1] - src[r0 * w + c0]) * fx;
                            let bottom =
                                src[r1 * w + c0] + (src[r1 * w + c1] - src[r1 * w + c0]) * fx;
                            top + (bottom - top) * fy
                        };
                        plane[y * s + x] = self.scale(v);
                    }
                }
            }
        }
        out
    }
}

/// One convolution with its batch normalisation folded in.
struct Conv {
    weight: Tensor,
    bias: Tensor,
    /// The bias as values, for the CPU kernel.
    bias_values: Vec<f32>,
    stride: usize,
    /// Padding of the height and width.
    padding: (usize, usize),
}

impl Conv {
    /// Builds `name` (`<name>.conv.weight`, `<name>.bn.{weight,bias,running_mean,running_var}`;
    /// a missing `bn.weight` is 1, as in TensorFlow's graph).
    fn new(
        tensors: &HashMap<String, Tensor>,
        name: &str,
        stride: usize,
        same: bool,
    ) -> Result<Self> {
        let get = |key: &str| {
            tensors
                .get(&format!("{name}.{key}"))
                .ok_or_else(|| {
                    Error::invalid("inception weights", format!("no tensor {name}.{key}"))
                })
                .and_then(|t| Ok(t.to_dtype(DType::F64)?))
        };
        let weight = get("conv.weight")?;
        let (o, _, kh, kw) = weight.dims4()?;
        let mean = get("bn.running_mean")?;
        let var = get("bn.running_var")?;
        let beta = get("bn.bias")?;
        let gamma = match tensors.get(&format!("{name}.bn.weight")) {
            Some(g) => g.to_dtype(DType::F64)?,
            None => Tensor::ones(o, DType::F64, weight.device())?,
        };
        for (what, t) in [
            ("running_mean", &mean),
            ("running_var", &var),
            ("bias", &beta),
        ] {
            if t.dims() != [o] {
                return Err(Error::invalid(
                    "inception weights",
                    format!("{name}.bn.{what} has shape {:?}, not [{o}]", t.dims()),
                ));
            }
        }
        // y = γ (conv(x) − μ) / sqrt(σ² + ε) + β, folded in f64 and rounded once.
        let scale = (gamma / (var + 0.001)?.sqrt()?)?;
        let bias = (beta - (&mean * &scale)?)?;
        let weight = weight.broadcast_mul(&scale.reshape((o, 1, 1, 1))?)?;
        let bias = bias.to_dtype(DType::F32)?;
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            bias_values: bias.to_vec1::<f32>()?,
            bias: bias.reshape((1, o, 1, 1))?,
            stride,
            padding: if same { (kh / 2, kw / 2) } else { (0, 0) },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (ph, pw) = self.padding;
        if x.device().is_cpu() {
            return Ok(crate::model::conv2d_bias_relu(
                x,
                &self.weight,
                &self.bias_values,
                self.stride,
                self.padding,
            )?);
        }
        let y = if ph == pw {
            x.conv2d(&self.weight, ph, self.stride, 1, 1)?
        } else {
            x.pad_with_zeros(2, ph, ph)?
                .pad_with_zeros(3, pw, pw)?
                .conv2d(&self.weight, 0, self.stride, 1, 1)?
        };
        Ok(y.broadcast_add(&self.bias)?.relu()?)
    }
}

/// 3×3 pooling with stride 1 and padding 1; the average leaves the padding out (TensorFlow's
/// `SAME` average pool), the max is over non-negative (post-ReLU) values, for which zero
/// padding changes nothing.
fn pool3x3_same(x: &Tensor, max: bool) -> Result<Tensor> {
    let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    if max {
        return Ok(padded.max_pool2d_with_stride(3, 1)?);
    }
    let (_, _, h, w) = x.dims4()?;
    let sums = padded.avg_pool2d_with_stride(3, 1)?;
    let ones = Tensor::ones((1, 1, h, w), DType::F32, x.device())?
        .pad_with_zeros(2, 1, 1)?
        .pad_with_zeros(3, 1, 1)?;
    let counts = ones.avg_pool2d_with_stride(3, 1)?;
    Ok(sums.broadcast_div(&counts)?)
}

/// An Inception block: its convolutions by name, and how they connect.
enum Block {
    /// 35×35 (`Mixed_5b/c/d`).
    A(HashMap<&'static str, Conv>),
    /// 35 → 17 (`Mixed_6a`).
    B(HashMap<&'static str, Conv>),
    /// 17×17 (`Mixed_6b…e`).
    C(HashMap<&'static str, Conv>),
    /// 17 → 8 (`Mixed_7a`).
    D(HashMap<&'static str, Conv>),
    /// 8×8 (`Mixed_7b/c`); `max` for the last block's pool branch.
    E(HashMap<&'static str, Conv>, bool),
}

/// `(name, stride, same padding)` of every convolution of a block kind.
fn block_convs(kind: char) -> &'static [(&'static str, usize, bool)] {
    match kind {
        'A' => &[
            ("branch1x1", 1, true),
            ("branch5x5_1", 1, true),
            ("branch5x5_2", 1, true),
            ("branch3x3dbl_1", 1, true),
            ("branch3x3dbl_2", 1, true),
            ("branch3x3dbl_3", 1, true),
            ("branch_pool", 1, true),
        ],
        'B' => &[
            ("branch3x3", 2, false),
            ("branch3x3dbl_1", 1, true),
            ("branch3x3dbl_2", 1, true),
            ("branch3x3dbl_3", 2, false),
        ],
        'C' => &[
            ("branch1x1", 1, true),
            ("branch7x7_1", 1, true),
            ("branch7x7_2", 1, true),
            ("branch7x7_3", 1, true),
            ("branch7x7dbl_1", 1, true),
            ("branch7x7dbl_2", 1, true),
            ("branch7x7dbl_3", 1, true),
            ("branch7x7dbl_4", 1, true),
            ("branch7x7dbl_5", 1, true),
            ("branch_pool", 1, true),
        ],
        'D' => &[
            ("branch3x3_1", 1, true),
            ("branch3x3_2", 2, false),
            ("branch7x7x3_1", 1, true),
            ("branch7x7x3_2", 1, true),
            ("branch7x7x3_3", 1, true),
            ("branch7x7x3_4", 2, false),
        ],
        _ => &[
            ("branch1x1", 1, true),
            ("branch3x3_1", 1, true),
            ("branch3x3_2a", 1, true),
            ("branch3x3_2b", 1, true),
            ("branch3x3dbl_1", 1, true),
            ("branch3x3dbl_2", 1, true),
            ("branch3x3dbl_3a", 1, true),
            ("branch3x3dbl_3b", 1, true),
            ("branch_pool", 1, true),
        ],
    }
}

/// The blocks in order: name and kind.
pub(super) const BLOCKS: [(&str, char); 11] = [
    ("Mixed_5b", 'A'),
    ("Mixed_5c", 'A'),
    ("Mixed_5d", 'A'),
    ("Mixed_6a", 'B'),
    ("Mixed_6b", 'C'),
    ("Mixed_6c", 'C'),
    ("Mixed_6d", 'C'),
    ("Mixed_6e", 'C'),
    ("Mixed_7a", 'D'),
    ("Mixed_7b", 'E'),
    ("Mixed_7c", 'E'),
];

/// The stem's convolutions: name, stride, same padding.
pub(super) const STEM: [(&str, usize, bool); 5] = [
    ("Conv2d_1a_3x3", 2, false),
    ("Conv2d_2a_3x3", 1, false),
    ("Conv2d_2b_3x3", 1, true),
    ("Conv2d_3b_1x1", 1, false),
    ("Conv2d_4a_3x3", 1, false),
];

/// Every convolution's name (`Conv2d_1a_3x3`, `Mixed_5b.branch1x1`, …), in network order.
pub(super) fn conv_names() -> Vec<String> {
    let mut out: Vec<String> = STEM.iter().map(|(n, _, _)| (*n).to_owned()).collect();
    for (block, kind) in BLOCKS {
        out.extend(
            block_convs(kind)
                .iter()
                .map(|(n, _, _)| format!("{block}.{n}")),
        );
    }
    out
}

impl Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let cat = |parts: &[Tensor]| -> Result<Tensor> { Ok(Tensor::cat(parts, 1)?) };
        match self {
            Block::A(c) => {
                let b1 = c["branch1x1"].forward(x)?;
                let b5 = c["branch5x5_2"].forward(&c["branch5x5_1"].forward(x)?)?;
                let b3 = c["branch3x3dbl_3"]
                    .forward(&c["branch3x3dbl_2"].forward(&c["branch3x3dbl_1"].forward(x)?)?)?;
                let bp = c["branch_pool"].forward(&pool3x3_same(x, false)?)?;
                cat(&[b1, b5, b3, bp])
            }
            Block::B(c) => {
                let b3 = c["branch3x3"].forward(x)?;
                let bd = c["branch3x3dbl_3"]
                    .forward(&c["branch3x3dbl_2"].forward(&c["branch3x3dbl_1"].forward(x)?)?)?;
                let bp = x.max_pool2d_with_stride(3, 2)?;
                cat(&[b3, bd, bp])
            }
            Block::C(c) => {
                let b1 = c["branch1x1"].forward(x)?;
                let mut b7 = x.clone();
                for n in ["branch7x7_1", "branch7x7_2", "branch7x7_3"] {
                    b7 = c[n].forward(&b7)?;
                }
                let mut bd = x.clone();
                for k in 1..=5 {
                    bd = c[format!("branch7x7dbl_{k}").as_str()].forward(&bd)?;
                }
                let bp = c["branch_pool"].forward(&pool3x3_same(x, false)?)?;
                cat(&[b1, b7, bd, bp])
            }
            Block::D(c) => {
                let b3 = c["branch3x3_2"].forward(&c["branch3x3_1"].forward(x)?)?;
                let mut b7 = x.clone();
                for k in 1..=4 {
                    b7 = c[format!("branch7x7x3_{k}").as_str()].forward(&b7)?;
                }
                let bp = x.max_pool2d_with_stride(3, 2)?;
                cat(&[b3, b7, bp])
            }
            Block::E(c, max) => {
                let b1 = c["branch1x1"].forward(x)?;
                let a = c["branch3x3_1"].forward(x)?;
                let b = c["branch3x3dbl_2"].forward(&c["branch3x3dbl_1"].forward(x)?)?;
                let bp = c["branch_pool"].forward(&pool3x3_same(x, *max)?)?;
                cat(&[
                    b1,
                    c["branch3x3_2a"].forward(&a)?,
                    c["branch3x3_2b"].forward(&a)?,
                    c["branch3x3dbl_3a"].forward(&b)?,
                    c["branch3x3dbl_3b"].forward(&b)?,
                    bp,
                ])
            }
        }
    }
}

/// The network, ready to compute features.
pub struct Inception {
    stem: Vec<Conv>,
    blocks: Vec<Block>,
    preprocess: Preprocess,
    device: Device,
}

impl Inception {
    /// Builds the network from tensors named the pytorch-fid way (see `weights`), with the
    /// preprocessing its weights come with.
    pub fn new(
        tensors: &HashMap<String, Tensor>,
        preprocess: Preprocess,
        device: &Device,
    ) -> Result<Self> {
        let stem = STEM
            .iter()
            .map(|&(name, stride, same)| Conv::new(tensors, name, stride, same))
            .collect::<Result<Vec<_>>>()?;
        let mut blocks = Vec::with_capacity(BLOCKS.len());
        for (i, (block, kind)) in BLOCKS.into_iter().enumerate() {
            let mut convs = HashMap::new();
            for &(name, stride, same) in block_convs(kind) {
                convs.insert(
                    name,
                    Conv::new(tensors, &format!("{block}.{name}"), stride, same)?,
                );
            }
            blocks.push(match kind {
                'A' => Block::A(convs),
                'B' => Block::B(convs),
                'C' => Block::C(convs),
                'D' => Block::D(convs),
                _ => Block::E(convs, i == BLOCKS.len() - 1),
            });
        }
        let to = |c: Conv| -> Result<Conv> {
            Ok(Conv {
                weight: c.weight.to_device(device)?,
                bias: c.bias.to_device(device)?,
                ..c
            })
        };
        Ok(Self {
            stem: stem.into_iter().map(to).collect::<Result<_>>()?,
            blocks: blocks
                .into_iter()
                .map(|b| {
                    let move_all = |m: HashMap<&'static str, Conv>| -> Result<_> {
                        m.into_iter().map(|(k, c)| Ok((k, to(c)?))).collect()
                    };
                    Ok(match b {
                        Block::A(m) => Block::A(move_all(m)?),
                        Block::B(m) => Block::B(move_all(m)?),
                        Block::C(m) => Block::C(move_all(m)?),
                        Block::D(m) => Block::D(move_all(m)?),
                        Block::E(m, max) => Block::E(move_all(m)?, max),
                    })
                })
                .collect::<Result<_>>()?,
            preprocess,
            device: device.clone(),
        })
    }

    /// The preprocessing the network applies.
    pub fn preprocess(&self) -> Preprocess {
        self.preprocess
    }

    /// `pool3` features `[N, 2048]` (f32) of images given as pixels (0–255) `[N, C, H, W]`,
    /// `C` 1 (replicated to RGB) or 3, any size (resized to 299×299).
    pub fn features(
        &self,
        pixels: &[f32],
        n: usize,
        c: usize,
        h: usize,
        w: usize,
    ) -> Result<Tensor> {
        if !(c == 1 || c == 3) || pixels.len() != n * c * h * w || h == 0 || w == 0 {
            return Err(Error::invalid(
                "images",
                format!(
                    "{} values for {n} images of {c}×{h}×{w} (1 or 3 channels)",
                    pixels.len()
                ),
            ));
        }
        let input = self.preprocess.apply(pixels, n, c, h, w);
        let mut x = Tensor::from_vec(input, (n, 3, INPUT_SIZE, INPUT_SIZE), &self.device)?;
        for (i, conv) in self.stem.iter().enumerate() {
            x = conv.forward(&x)?;
            // Max pools after Conv2d_2b (147 → 73) and Conv2d_4a (71 → 35).
            if i == 2 || i == 4 {
                x = x.max_pool2d_with_stride(3, 2)?;
            }
        }
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        Ok(x.mean_keepdim(3)?.mean_keepdim(2)?.reshape((n, FEATURES))?)
    }
}
