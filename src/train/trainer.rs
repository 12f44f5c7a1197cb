//! One training step of an EDM2 network (NVlabs/edm2 `training/training_loop.py`): the
//! EDM2 loss with learned uncertainty, Adam with EDM2's inverse-square-root learning-rate
//! schedule, forced weight normalisation each step, non-finite gradients zeroed; and the
//! trainer's whole state for checkpoints.

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::adam;
use crate::model::{edm2_loss, force_normalize, Edm2Config, Precond};

/// EDM2's learning rate at `cur_nimg` (`learning_rate_schedule`): `ref_lr`, divided by
/// `sqrt(t / t_ref)` once `t = cur_nimg / batch_size` passes `ref_batches`, times a linear
/// ramp-up over the first `rampup_mimg` million images.
pub fn learning_rate(
    cur_nimg: u64,
    batch_size: usize,
    ref_lr: f64,
    ref_batches: f64,
    rampup_mimg: f64,
) -> f64 {
    let mut lr = ref_lr;
    if ref_batches > 0.0 {
        lr /= (cur_nimg as f64 / (ref_batches * batch_size as f64))
            .max(1.0)
            .sqrt();
    }
    if rampup_mimg > 0.0 {
        lr *= (cur_nimg as f64 / (rampup_mimg * 1e6)).min(1.0);
    }
    lr
}

/// Training settings, EDM2's names and defaults where EDM2 has them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The network.
    pub network: Edm2Config,
    /// Images per step.
    pub batch_size: usize,
    /// Reference learning rate.
    pub ref_lr: f64,
    /// Batches after which the learning rate starts to decay as `1/sqrt(t)`.
    pub ref_batches: f64,
    /// Linear warm-up length in millions of images.
    pub rampup_mimg: f64,
    /// Mean of the log-normal noise-level distribution.
    pub p_mean: f64,
    /// Its standard deviation.
    pub p_std: f64,
    /// Adam β₁.
    pub beta1: f64,
    /// Adam β₂.
    pub beta2: f64,
    /// Adam ε.
    pub eps: f64,
    /// Seed for initialisation, noise and data order.
    pub seed: u64,
}

impl TrainConfig {
    /// EDM2's defaults for `network`.
    pub fn new(network: Edm2Config, batch_size: usize) -> Self {
        Self {
            network,
            batch_size,
            ref_lr: 0.01,
            ref_batches: 70e3,
            rampup_mimg: 10.0,
            p_mean: -0.4,
            p_std: 1.0,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            seed: 0,
        }
    }
}

/// Adam (no weight decay) with state that can be saved and restored.
struct Adam {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
}

/// What one training step did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean loss per image (sum over pixels, mean over the batch).
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// The state of a training run.
pub struct Trainer {
    /// Settings.
    pub config: TrainConfig,
    /// Trainable parameters with their state-dict names, sorted by name.
    pub params: Vec<(String, Var)>,
    buffers: Vec<(String, Tensor)>,
    net: Precond,
    adam: Adam,
    /// Training images seen so far.
    pub cur_nimg: u64,
    device: Device,
}

fn normal(rng: &mut rand::rngs::StdRng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(v, shape, device)
}

impl Trainer {
    /// A freshly initialised network as EDM2 initialises it: unit-Gaussian weights, zero
    /// gains, Fourier frequencies `2π·N(0, 1)` and phases `2π·U(0, 1)`.
    pub fn new(config: TrainConfig, device: &Device) -> Result<Self> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
        // Discover names and shapes by building the network over a recording VarMap.
        let varmap = candle_nn::VarMap::new();
        {
            let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
            Precond::new(vb, &config.network)?;
        }
        let mut named: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .expect("varmap")
            .clone()
            .into_iter()
            .collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        for (name, var) in named {
            let shape = var.dims().to_vec();
            let value = if name.ends_with("freqs") {
                (normal(&mut rng, &shape, device)? * (2.0 * std::f64::consts::PI))?
            } else if name.ends_with("phases") {
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| rand::Rng::random::<f32>(&mut rng) * std::f32::consts::TAU)
                    .collect();
                Tensor::from_vec(v, shape.as_slice(), device)?
            } else if shape.is_empty() {
                Tensor::zeros((), DType::F32, device)?
            } else {
                normal(&mut rng, &shape, device)?
            };
            if name.contains("fourier") {
                buffers.push((name, value));
            } else {
                params.push((name, Var::from_tensor(&value)?));
            }
        }
        Self::assemble(config, params, buffers, 0, device)
    }

    fn assemble(
        config: TrainConfig,
        params: Vec<(String, Var)>,
        buffers: Vec<(String, Tensor)>,
        cur_nimg: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut tensors = std::collections::HashMap::new();
        for (name, var) in &params {
            tensors.insert(name.clone(), var.as_tensor().clone());
        }
        for (name, t) in &buffers {
            tensors.insert(name.clone(), t.clone());
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let net = Precond::new(vb, &config.network)?;
        let zeros = |p: &(String, Var)| p.1.as_tensor().zeros_like();
        let adam = Adam {
            m: params.iter().map(zeros).collect::<Result<_>>()?,
            v: params.iter().map(zeros).collect::<Result<_>>()?,
            step: 0,
        };
        Ok(Self {
            config,
            params,
            buffers,
            net,
            adam,
            cur_nimg,
            device: device.clone(),
        })
    }

    /// The complete training state as named tensors (`param/…`, `buffer/…`, `adam_m/…`,
    /// `adam_v/…`) and metadata (`cur_nimg`, `adam_step`, `config` as JSON), ready to be
    /// written as one safetensors file.
    pub fn checkpoint(
        &self,
    ) -> (
        Vec<(String, Tensor)>,
        std::collections::BTreeMap<String, String>,
    ) {
        let mut tensors = Vec::new();
        for (i, (name, var)) in self.params.iter().enumerate() {
            tensors.push((format!("param/{name}"), var.as_tensor().clone()));
            tensors.push((format!("adam_m/{name}"), self.adam.m[i].clone()));
            tensors.push((format!("adam_v/{name}"), self.adam.v[i].clone()));
        }
        for (name, t) in &self.buffers {
            tensors.push((format!("buffer/{name}"), t.clone()));
        }
        let meta = std::collections::BTreeMap::from([
            ("hindsight_checkpoint".to_owned(), "1".to_owned()),
            ("cur_nimg".to_owned(), self.cur_nimg.to_string()),
            ("adam_step".to_owned(), self.adam.step.to_string()),
            (
                "config".to_owned(),
                serde_json::to_string(&self.config).expect("config serialises"),
            ),
        ]);
        (tensors, meta)
    }

    /// Restores a trainer from [`Trainer::checkpoint`]'s tensors and metadata.
    pub fn restore(
        tensors: &std::collections::HashMap<String, Tensor>,
        meta: &std::collections::BTreeMap<String, String>,
        device: &Device,
    ) -> Result<Self> {
        let bad = |m: String| candle_core::Error::Msg(format!("checkpoint: {m}"));
        let field = |k: &str| {
            meta.get(k)
                .ok_or_else(|| bad(format!("no {k} in its metadata")))
        };
        if field("hindsight_checkpoint")? != "1" {
            return Err(bad("unknown checkpoint format".into()));
        }
        let config: TrainConfig =
            serde_json::from_str(field("config")?).map_err(|e| bad(format!("config: {e}")))?;
        let cur_nimg: u64 = field("cur_nimg")?
            .parse()
            .map_err(|_| bad("cur_nimg".into()))?;
        let step: u64 = field("adam_step")?
            .parse()
            .map_err(|_| bad("adam_step".into()))?;
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        let mut params = Vec::new();
        let mut buffers = Vec::new();
        for key in names {
            let t = tensors[key].to_device(device)?;
            if let Some(name) = key.strip_prefix("param/") {
                params.push((name.to_owned(), Var::from_tensor(&t)?));
            } else if let Some(name) = key.strip_prefix("buffer/") {
                buffers.push((name.to_owned(), t));
            }
        }
        let mut trainer = Self::assemble(config, params, buffers, cur_nimg, device)?;
        for (i, (name, _)) in trainer.params.iter().enumerate() {
            let get = |prefix: &str| {
                tensors
                    .get(&format!("{prefix}/{name}"))
                    .ok_or_else(|| bad(format!("no {prefix}/{name}")))
                    .and_then(|t| t.to_device(device))
            };
            trainer.adam.m[i] = get("adam_m")?;
            trainer.adam.v[i] = get("adam_v")?;
        }
        trainer.adam.step = step;
        Ok(trainer)
    }

    /// The network (sharing the trainer's parameters).
    pub fn net(&self) -> &Precond {
        &self.net
    }

    /// Every tensor of the network by state-dict name (parameters and Fourier buffers).
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .chain(self.buffers.iter().cloned())
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// One optimisation step on `images` [N, C, H, W] in [−1, 1] (and one-hot `labels`).
    pub fn step(&mut self, images: &Tensor, labels: Option<&Tensor>) -> Result<StepStats> {
        let cfg = &self.config;
        let batch = images.dim(0)?;
        let lr = learning_rate(
            self.cur_nimg,
            cfg.batch_size,
            cfg.ref_lr,
            cfg.ref_batches,
            cfg.rampup_mimg,
        );
        force_normalize(&self.params)?;
        // Noise levels and noise of step k come from a stream seeded by (seed, k), so a run
        // resumed from a checkpoint continues exactly as it would have.
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            cfg.seed ^ crate::model::formula::splitmix64(self.adam.step),
        );
        let ln_sigma = normal(&mut rng, &[batch], &self.device)?;
        let sigma = ln_sigma.affine(cfg.p_std, cfg.p_mean)?.exp()?;
        let noise = normal(&mut rng, images.dims(), &self.device)?;
        let loss = edm2_loss(&self.net, images, &sigma, &noise, labels)?;
        let objective = (loss.sum_all()? / batch as f64)?;
        let grads = objective.backward()?;
        self.adam.step += 1;
        let update = adam::AdamStep {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            lr,
            t: self.adam.step as i32,
        };
        for (i, (_, var)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // Non-finite gradients are zeroed (EDM2: nan_to_num) inside the update.
            let (m, v) = update.apply(var, g, &self.adam.m[i], &self.adam.v[i])?;
            self.adam.m[i] = m;
            self.adam.v[i] = v;
        }
        self.cur_nimg += batch as u64;
        Ok(StepStats {
            loss: objective.to_scalar::<f32>()? as f64,
            lr,
        })
    }
}
