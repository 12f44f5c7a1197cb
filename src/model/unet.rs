//! EDM2's U-Net, [`UNet`] (NVlabs/edm2 `training/networks_edm2.py`): the noise and class
//! embedding, the encoder and decoder [`Block`]s with their skip connections, and the output
//! convolution. Layers are named as in EDM2's state dict (`enc.16x16_block0`, …).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::config::Edm2Config;
use super::layers::{Block, Flavor, Gain, MpConv, MpFourier};
use super::ops::{mp_cat, mp_silu, mp_sum, Resample};

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
