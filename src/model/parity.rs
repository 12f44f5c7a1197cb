//! The reference fixture of the EDM2 network (`edm2_unet_public.safetensors` and its JSON
//! description, computed by NVlabs/edm2 in PyTorch float32) and the comparisons against it.
//!
//! Used by the parity tests and by `hindsight bench parity`, which runs the same comparisons
//! on whatever device the binary computes on (the CUDA build's check on a GPU machine).
//! The network is built from the JSON's config with formula weights rebuilt from its weight
//! spec, so a fixture for another configuration checks the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use super::config::Edm2Config;
use super::formula::{self, Kind};
use super::precond::{edm2_loss, force_normalize, Precond};
use super::sampler::{edm_sampler, SamplerConfig};

/// The fixture's tensors and its JSON description (the `edm2_unet` section).
pub struct Fixture {
    tensors: HashMap<String, Tensor>,
    /// The `edm2_unet` section of the JSON: config, sigma_data, weight_spec, sampler, …
    pub spec: serde_json::Value,
    device: Device,
}

/// Paths of the fixture and its JSON: `HINDSIGHT_EDM2_FIXTURE` and
/// `HINDSIGHT_EDM2_FIXTURE_JSON` when set, else `edm2_unet.safetensors` / `edm2_unet.json` in
/// `dir` (the tests pass `tests/fixtures` of the crate).
pub fn fixture_paths(dir: &Path) -> (PathBuf, PathBuf) {
    let var = |name: &str, default: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join(default))
    };
    (
        var("HINDSIGHT_EDM2_FIXTURE", "edm2_unet.safetensors"),
        var("HINDSIGHT_EDM2_FIXTURE_JSON", "edm2_unet.json"),
    )
}

impl Fixture {
    /// Loads the fixture's tensors onto `device`.
    pub fn load(tensors: &Path, json: &Path, device: &Device) -> anyhow::Result<Self> {
        let loaded = candle_core::safetensors::load(tensors, device)
            .with_context(|| format!("reading the fixture {}", tensors.display()))?;
        let text = std::fs::read_to_string(json)
            .with_context(|| format!("reading the fixture description {}", json.display()))?;
        let spec: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
        let spec = spec
            .get("edm2_unet")
            .cloned()
            .ok_or_else(|| anyhow!("{} has no \"edm2_unet\" section", json.display()))?;
        Ok(Self {
            tensors: loaded,
            spec,
            device: device.clone(),
        })
    }

    /// A fixture tensor by key.
    pub fn get(&self, key: &str) -> anyhow::Result<&Tensor> {
        self.tensors
            .get(key)
            .ok_or_else(|| anyhow!("the fixture has no tensor {key:?}"))
    }

    /// The class labels stored under `key` for a class-conditional network (`label_dim` > 0),
    /// `None` for an unconditional one (whose fixtures have no labels).
    pub fn labels(&self, key: &str) -> anyhow::Result<Option<&Tensor>> {
        if self.config()?.label_dim == 0 {
            Ok(None)
        } else {
            self.get(key).map(Some)
        }
    }

    /// All fixture tensors.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// The network configuration (the JSON's config with its sigma_data).
    pub fn config(&self) -> anyhow::Result<Edm2Config> {
        let mut config = self.spec["config"].clone();
        if let Some(sd) = self.spec.get("sigma_data") {
            config["sigma_data"] = sd.clone();
        }
        serde_json::from_value(config).context("the fixture's network config")
    }

    /// Formula weights for every key of the weight spec, on the fixture's device.
    pub fn weights(&self) -> anyhow::Result<HashMap<String, Tensor>> {
        let spec = self.spec["weight_spec"]
            .as_object()
            .ok_or_else(|| anyhow!("the fixture description has no weight_spec"))?;
        let mut out = HashMap::new();
        for (key, s) in spec {
            let shape: Vec<usize> = serde_json::from_value(s["shape"].clone())
                .with_context(|| format!("weight_spec {key}: shape"))?;
            let kind: Kind = serde_json::from_value(s["kind"].clone())
                .with_context(|| format!("weight_spec {key}: kind"))?;
            let values = formula::values(
                key,
                shape.iter().product(),
                kind,
                s["scale"].as_f64().unwrap_or(1.0),
                s["offset"].as_f64().unwrap_or(0.0),
            );
            out.insert(key.clone(), Tensor::from_vec(values, shape, &self.device)?);
        }
        Ok(out)
    }

    /// The network with the formula weights, as constants (for evaluation).
    pub fn network(&self) -> anyhow::Result<Precond> {
        let vb = VarBuilder::from_tensors(self.weights()?, DType::F32, &self.device);
        Ok(Precond::new(vb, &self.config()?)?)
    }

    /// The clean images of the loss case: formula inputs (`loss/images`, kind sym, scale 1)
    /// shaped like `loss/noise_unit`, which the fixture does not ship.
    pub fn loss_images(&self) -> anyhow::Result<Tensor> {
        let like = self.get("loss/noise_unit")?;
        let values = formula::values("loss/images", like.elem_count(), Kind::Sym, 1.0, 0.0);
        Ok(Tensor::from_vec(values, like.dims(), &self.device)?)
    }

    /// The sampler settings of the sampler case.
    pub fn sampler(&self) -> anyhow::Result<SamplerConfig> {
        serde_json::from_value(self.spec["sampler"].clone()).context("the fixture's sampler")
    }
}

/// `max |got − want| / max |want|` (shapes must agree).
pub fn max_rel_error(got: &Tensor, want: &Tensor) -> anyhow::Result<f64> {
    if got.dims() != want.dims() {
        bail!("shape {:?}, expected {:?}", got.dims(), want.dims());
    }
    let flat = |t: &Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (g, w) = (flat(got)?, flat(want)?);
    let scale = w
        .iter()
        .fold(0f64, |m, v| m.max(v.abs() as f64))
        .max(f64::MIN_POSITIVE);
    let err = g.iter().zip(&w).fold(0f64, |m, (a, b)| {
        let d = (*a as f64 - *b as f64).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    });
    Ok(err / scale)
}

/// One comparison: what, the relative error observed, the tolerance the reference supports.
#[derive(Clone, Debug)]
pub struct Comparison {
    /// What was compared (a fixture key, or a summary such as the worst gradient).
    pub what: String,
    /// `max |got − want| / max |want|`.
    pub error: f64,
    /// The tolerance it is held to.
    pub tolerance: f64,
}

impl Comparison {
    /// Whether the error is within the tolerance.
    pub fn ok(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// Forward pass (denoised, log-variance), forced weight normalisation, the EDM2 loss and the
/// gradient of every parameter, and the sampler, each against the fixture, computed on the
/// fixture's device. Tolerances: 1e-5 for outputs and the loss, 1e-6 for normalised weights,
/// 1e-4 for gradients (what float32 in the reference itself supports).
pub fn compare_all(fixture: &Fixture) -> anyhow::Result<Vec<Comparison>> {
    let mut out = Vec::new();
    let compare = |what: &str, got: &Tensor, want: &Tensor, tolerance: f64| {
        let error = max_rel_error(got, want).with_context(|| what.to_string())?;
        anyhow::Ok(Comparison {
            what: what.to_string(),
            error,
            tolerance,
        })
    };

    let net = fixture.network()?;
    let labels = fixture.labels("input/class_labels")?;
    let (denoised, logvar) =
        net.forward(fixture.get("input/x")?, fixture.get("input/sigma")?, labels)?;
    out.push(compare(
        "output/denoised",
        &denoised,
        fixture.get("output/denoised")?,
        1e-5,
    )?);
    out.push(compare(
        "output/logvar",
        &logvar,
        fixture.get("output/logvar")?,
        1e-5,
    )?);

    let samples = edm_sampler(
        &net,
        fixture.get("sampler/noise")?,
        labels,
        &fixture.sampler()?,
        |_, _| {},
    )?;
    out.push(compare(
        "sampler/samples",
        &samples,
        fixture.get("sampler/samples")?,
        1e-5,
    )?);

    let case = LossCase::new(fixture, DType::F32, &fixture.device)?;
    let normalized: Vec<(String, Tensor)> = case
        .params
        .iter()
        .map(|(key, var)| (key.clone(), var.as_tensor().clone()))
        .collect();
    let worst = worst_error("forced_normalized", &normalized, |key| {
        Ok(fixture.get(&format!("forced_normalized/{key}"))?.clone())
    })?;
    out.push(Comparison {
        what: format!("forced_normalized/* (worst: {})", worst.1),
        error: worst.0,
        tolerance: 1e-6,
    });
    out.push(compare(
        "loss/per_element",
        &case.loss,
        fixture.get("loss/per_element")?,
        1e-5,
    )?);
    out.push(compare(
        "loss/mean_over_batch_sum",
        &case.objective.reshape(1)?,
        fixture.get("loss/mean_over_batch_sum")?,
        1e-5,
    )?);
    let ours = case.gradients()?;
    let want = |key: &str| fixture.get(&format!("grad/{key}"));
    let worst = worst_error("grad", &ours, |key| Ok(want(key)?.clone()))?;
    out.push(Comparison {
        what: format!("grad/* of {} parameters (worst: {})", ours.len(), worst.1),
        error: worst.0,
        tolerance: 1e-4,
    });
    // Both float32 computations against the same network in float64 (on the CPU): how far
    // each one's rounding takes it from the exact gradients, as opposed to from each other.
    let exact: HashMap<String, Tensor> = LossCase::new(fixture, DType::F64, &Device::Cpu)?
        .gradients()?
        .into_iter()
        .collect();
    let truth = |key: &str| {
        exact
            .get(key)
            .cloned()
            .ok_or_else(|| anyhow!("no float64 gradient for {key}"))
    };
    let reference: Vec<(String, Tensor)> = ours
        .iter()
        .map(|(key, _)| Ok((key.clone(), want(key)?.clone())))
        .collect::<anyhow::Result<_>>()?;
    for (whose, grads) in [("ours", &ours), ("the fixture's", &reference)] {
        let worst = worst_error("grad", grads, truth)?;
        out.push(Comparison {
            what: format!("grad/* vs float64, {whose} (worst: {})", worst.1),
            error: worst.0,
            tolerance: 1e-4,
        });
    }
    Ok(out)
}

/// The largest [`max_rel_error`] of `got` against `want(key)` over all keys, and its key
/// (`what` names the tensors in errors).
fn worst_error(
    what: &str,
    got: &[(String, Tensor)],
    want: impl Fn(&str) -> anyhow::Result<Tensor>,
) -> anyhow::Result<(f64, String)> {
    let mut worst = (0.0f64, String::new());
    for (key, tensor) in got {
        let e = max_rel_error(tensor, &want(key)?).with_context(|| format!("{what}/{key}"))?;
        if e >= worst.0 {
            worst = (e, key.clone());
        }
    }
    Ok(worst)
}

/// The fixture's loss case computed in `dtype`: the formula weights as trainable parameters
/// (sorted by name; the Fourier buffers stay constants), forced-normalised, the EDM2 loss per
/// element and its batch mean. In float64 the CPU runs the composed definitions and candle's
/// convolution (the fused kernels and Winograd are float32 only), which gives a reference
/// for the rounding of both the float32 fixture and this crate's float32 path.
pub struct LossCase {
    /// Trainable parameters by EDM2 state-dict key, sorted.
    pub params: Vec<(String, Var)>,
    /// The loss per element.
    pub loss: Tensor,
    /// `Σ loss / N`, the quantity the fixture's gradients are of.
    pub objective: Tensor,
}

impl LossCase {
    /// Builds and runs the case in `dtype` on `device`.
    pub fn new(fixture: &Fixture, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let mut params = Vec::new();
        let mut tensors = HashMap::new();
        for (key, t) in fixture.weights()? {
            let t = t.to_device(device)?.to_dtype(dtype)?;
            if key.contains("fourier") {
                tensors.insert(key, t);
            } else {
                let var = Var::from_tensor(&t)?;
                tensors.insert(key.clone(), var.as_tensor().clone());
                params.push((key, var));
            }
        }
        params.sort_by(|a, b| a.0.cmp(&b.0));
        force_normalize(&params)?;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        let net = Precond::new(vb, &fixture.config()?)?;
        let input = |key: &str| anyhow::Ok(fixture.get(key)?.to_device(device)?.to_dtype(dtype)?);
        let images = fixture.loss_images()?.to_device(device)?.to_dtype(dtype)?;
        let labels = match fixture.labels("loss/class_labels")? {
            Some(l) => Some(l.to_device(device)?.to_dtype(dtype)?),
            None => None,
        };
        let loss = edm2_loss(
            &net,
            &images,
            &input("loss/sigma")?,
            &input("loss/noise_unit")?,
            labels.as_ref(),
        )?;
        let objective = (loss.sum_all()? / images.dim(0)? as f64)?;
        Ok(Self {
            params,
            loss,
            objective,
        })
    }

    /// The gradient of the objective for every parameter, in [`Self::params`] order.
    pub fn gradients(&self) -> anyhow::Result<Vec<(String, Tensor)>> {
        let grads = self.objective.backward()?;
        self.params
            .iter()
            .map(|(key, var)| {
                let grad = grads
                    .get(var.as_tensor())
                    .ok_or_else(|| anyhow!("no gradient reached {key}"))?;
                Ok((key.clone(), grad.clone()))
            })
            .collect()
    }
}
