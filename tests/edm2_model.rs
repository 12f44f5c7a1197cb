//! Parity of the EDM2 network with the reference implementation (NVlabs/edm2
//! `training/networks_edm2.py`, PyTorch float32): primitives and the full forward pass of
//! `Precond` (denoised image and log-variance).
//!
//! Every test runs on two fixtures, copied into tests/fixtures by
//! tests/fixtures/make_edm2_fixture.py: the class-conditional RGB network (`edm2_unet`, which
//! `HINDSIGHT_EDM2_FIXTURE` and `HINDSIGHT_EDM2_FIXTURE_JSON` replace with any other fixture)
//! and the unconditional 1-channel 32×32 network (`edm2_unet_uncond-gray`, shaped like a
//! Fashion-MNIST model). The network is built from the JSON's config with formula weights
//! rebuilt from the JSON's weight spec.

use std::path::Path;

use candle_core::{Device, Tensor};
use hindsight::model::formula::{self, Kind};
use hindsight::model::parity::{self, fixture_paths, Fixture};
use hindsight::model::{self, Edm2Config, Resample};

/// The fixtures every test runs on: the default one (or the environment's) and the
/// unconditional greyscale one, with their names.
fn fixtures() -> Vec<(String, Fixture)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let (tensors, json) = fixture_paths(&dir);
    let uncond = (
        dir.join("edm2_unet_uncond-gray.safetensors"),
        dir.join("edm2_unet_uncond-gray.json"),
    );
    [(tensors, json), uncond]
        .into_iter()
        .map(|(tensors, json)| {
            let fixture = Fixture::load(&tensors, &json, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{}: {e:#}", tensors.display()));
            (tensors.display().to_string(), fixture)
        })
        .collect()
}

/// Formula values (kind sym, scale 1) named `name`, shaped `shape`, on the CPU.
fn formula_tensor(name: &str, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(
        formula::values(name, n, Kind::Sym, 1.0, 0.0),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Asserts `max |got − want| ≤ tol · max |want|` and returns the observed ratio.
#[track_caller]
fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> f64 {
    let e = parity::max_rel_error(got, want).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        e <= tol,
        "{what}: max error {e:e} relative (tolerance {tol:e})"
    );
    e
}

#[test]
fn formula_weights_match_the_fixture_bit_for_bit_where_it_ships_them() {
    for (name, fixture) in fixtures() {
        eprintln!("fixture {name}");
        formula_weights_match(&fixture);
    }
}

fn formula_weights_match(fixture: &Fixture) {
    let weights = fixture.weights().unwrap();
    assert_eq!(
        weights.len(),
        fixture.spec["weight_spec"].as_object().unwrap().len()
    );
    // The committed fixture leaves the weights out (they are rebuilt); the full reference
    // file, pointed at by HINDSIGHT_EDM2_FIXTURE, carries them as `weights/<key>`.
    for (key, ours) in &weights {
        if let Some(theirs) = fixture.tensors().get(&format!("weights/{key}")) {
            assert_eq!(flat(ours), flat(theirs), "{key}");
        }
    }
    // Spot values of the formula itself, independent of the fixture.
    assert_eq!(formula::fnv1a64(""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(formula::fnv1a64("a"), 0xaf63_dc4c_8601_ec8c);
    let u = formula::unit("prim/a", 0);
    assert!((0.0..1.0).contains(&u));
    let a = flat(fixture.get("prim/a").unwrap());
    let rebuilt = formula::values("prim/a", a.len(), Kind::Sym, 1.0, 0.0);
    assert_eq!(a, rebuilt, "the primitives' input is formula-generated too");
}

#[test]
fn primitives_match_the_reference() {
    for (name, fixture) in fixtures() {
        eprintln!("fixture {name}");
        primitives_match(&fixture);
    }
}

fn primitives_match(fixture: &Fixture) {
    let a = fixture.get("prim/a").unwrap();
    let b = fixture.get("prim/b").unwrap();
    let tol = 1e-6;
    check(
        "normalize(a)",
        &model::normalize(a, None).unwrap(),
        fixture.get("prim/normalize_a").unwrap(),
        tol,
    );
    check(
        "normalize(a, dim=1)",
        &model::normalize(a, Some(&[1])).unwrap(),
        fixture.get("prim/normalize_a_dim1").unwrap(),
        tol,
    );
    check(
        "mp_silu(a)",
        &model::mp_silu(a).unwrap(),
        fixture.get("prim/mp_silu_a").unwrap(),
        tol,
    );
    for t in [0.5, 0.7] {
        check(
            &format!("mp_cat(a, b, t={t})"),
            &model::mp_cat(a, b, t).unwrap(),
            fixture.get(&format!("prim/mp_cat_a_b_t{t}")).unwrap(),
            tol,
        );
    }
    check(
        "resample down",
        &model::resample(a, Resample::Down).unwrap(),
        fixture.get("prim/resample_down_a").unwrap(),
        tol,
    );
    check(
        "resample up",
        &model::resample(a, Resample::Up).unwrap(),
        fixture.get("prim/resample_up_a").unwrap(),
        tol,
    );
    // mp_sum: the fixture's second operand is not described, so check the definition: it
    // preserves unit magnitude for independent unit-variance inputs and interpolates.
    let s = model::mp_sum(a, a, 0.3).unwrap();
    let expect = (a / ((0.7f64 * 0.7 + 0.09).sqrt())).unwrap();
    check("mp_sum(a, a)", &s, &expect, 1e-6);
}

#[test]
fn network_loss_gradients_and_sampler_match_the_reference() {
    let all = fixtures();
    let configs: Vec<_> = all.iter().map(|(_, f)| f.config().unwrap()).collect();
    assert!(
        configs
            .iter()
            .any(|c| c.label_dim == 0 && c.img_channels == 1),
        "an unconditional greyscale network is among the fixtures"
    );
    for (name, fixture) in all {
        eprintln!("fixture {name}");
        network_matches(&fixture);
    }
}

fn network_matches(fixture: &Fixture) {
    // Forward pass (denoised, log-variance), the sampler for the given noise, forced weight
    // normalisation, the EDM2 loss and every parameter's gradient: the same comparisons
    // `hindsight bench parity` runs on other devices.
    let results = parity::compare_all(fixture).unwrap();
    for c in &results {
        eprintln!(
            "{:<70} {:.2e} (tolerance {:.0e})",
            c.what, c.error, c.tolerance
        );
    }
    let failed: Vec<_> = results.iter().filter(|c| !c.ok()).collect();
    assert!(failed.is_empty(), "outside tolerance: {failed:#?}");
    for key in [
        "output/denoised",
        "output/logvar",
        "sampler/samples",
        "loss/per_element",
    ] {
        assert!(results.iter().any(|c| c.what == key), "{key} not compared");
    }
    assert!(results.iter().any(|c| c.what.starts_with("grad/* of ")));
    // Against the same network in float64: our float32 gradients (fused kernels, Winograd
    // convolutions) stay as close to the exact ones as the reference's own float32 run does
    // (measured: 1.5e-5 and 2.6e-5 at worst), not just close to that run.
    let vs_f64 = |whose: &str| {
        let prefix = format!("grad/* vs float64, {whose} ");
        results
            .iter()
            .find(|c| c.what.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{prefix} not compared"))
            .error
    };
    let (ours, reference) = (vs_f64("ours"), vs_f64("the fixture's"));
    assert!(
        ours <= 1.5 * reference,
        "float32 gradients {ours:e} from float64, the reference's own {reference:e}"
    );
    // EDM2's default schedule:
    let t = model::sampler::SamplerConfig::default().noise_levels();
    assert_eq!(t.len(), 33);
    assert!((t[0] - 80.0).abs() < 1e-4 && (t[31] - 0.002).abs() < 1e-8 && t[32] == 0.0);
}

#[test]
fn config_has_edm2_defaults_and_round_trips() {
    let config: Edm2Config =
        serde_json::from_str(r#"{"img_resolution": 64, "img_channels": 4, "label_dim": 1000}"#)
            .unwrap();
    assert_eq!(config.model_channels, 192);
    assert_eq!(config.channel_mult, [1, 2, 3, 4]);
    assert_eq!(config.attn_resolutions, [16, 8]);
    assert_eq!((config.num_blocks, config.channels_per_head), (3, 64));
    assert_eq!(
        (config.res_balance, config.attn_balance, config.clip_act),
        (0.3, 0.3, 256.0)
    );
    assert_eq!((config.sigma_data, config.logvar_channels), (0.5, 128));
    let text = serde_json::to_string(&config).unwrap();
    assert_eq!(serde_json::from_str::<Edm2Config>(&text).unwrap(), config);
    let err = serde_json::from_str::<Edm2Config>(
        r#"{"img_resolution": 64, "img_channels": 4, "label_dim": 0, "chanel_mult": [1]}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("chanel_mult"), "{err}");
}

#[test]
fn gemm_convolution_matches_candles_conv2d_with_gradients() {
    let make = formula_tensor;
    for (k, (n, c, h, w), o) in [
        (3, (2, 5, 7, 6), 4),
        (3, (9, 3, 4, 5), 5), // more images than one weight-gradient group, not a multiple
        (1, (3, 4, 5, 5), 6),
        (5, (2, 2, 3, 4), 3), // kernel larger than the image
        (3, (1, 1, 1, 3), 2),
        (3, (5, 3, 12, 11), 4), // H·W ≥ 128: weight gradient computed transposed
        (1, (6, 2, 16, 9), 3),
        (3, (2, 2, 2, 1), 3), // a one-pixel-wide image: every shifted entry is padding
        // C·k ≥ 48: lowered to kernel rows (k products per image) instead of im2col; for the
        // input gradient that is O·k ≥ 48.
        (3, (5, 16, 6, 5), 4),
        (3, (2, 3, 5, 4), 17),
        (5, (2, 10, 4, 7), 11),
        (3, (2, 20, 12, 11), 18), // both, with H·W ≥ 128
        (3, (1, 16, 2, 1), 16),   // kernel rows of a one-pixel-wide image
        // Even H and W, C and O ≥ 16: Winograd F(2×2, 3×3) for all three products.
        (3, (5, 16, 8, 6), 17),
        (3, (3, 24, 2, 4), 16),   // one tile row
        (3, (11, 16, 4, 4), 16),  // fewer images than one chunk's worth of tiles
        (3, (9, 17, 16, 16), 19), // the last chunk short of images
        (3, (2, 16, 6, 5), 16),   // odd W: not Winograd
    ] {
        // Plain, and with EDM2's activation applied to the input inside the convolution
        // (against the separate activation followed by candle's convolution).
        for act in [model::InputAct::Identity, model::InputAct::MpSilu] {
            let x = candle_core::Var::from_tensor(&make("x", &[n, c, h, w])).unwrap();
            let wt = candle_core::Var::from_tensor(&make("w", &[o, c, k, k])).unwrap();
            let r = make("r", &[n, o, h, w]);
            let ours = model::conv2d_same_act(x.as_tensor(), wt.as_tensor(), act).unwrap();
            let input = match act {
                model::InputAct::Identity => x.as_tensor().clone(),
                model::InputAct::MpSilu => model::composed::mp_silu(x.as_tensor()).unwrap(),
            };
            let theirs = input.conv2d(wt.as_tensor(), k / 2, 1, 1, 1).unwrap();
            check(&format!("conv k={k} {act:?} forward"), &ours, &theirs, 1e-6);
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (what, v) in [("input", &x), ("weight", &wt)] {
                check(
                    &format!("conv k={k} {act:?} grad {what}"),
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                    1e-5,
                );
            }
            // An input no parameter led to (the network's first layer) gets no gradient; the
            // weight's is unchanged.
            let plain = make("x", &[n, c, h, w]);
            let y = model::conv2d_same_act(&plain, wt.as_tensor(), act).unwrap();
            let g3 = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g3.get(&plain).is_none());
            check(
                &format!("conv k={k} {act:?} grad weight, untracked input"),
                g3.get(wt.as_tensor()).unwrap(),
                g2.get(wt.as_tensor()).unwrap(),
                1e-5,
            );
        }
    }
}

#[test]
fn an_images_convolution_does_not_depend_on_its_batch() {
    // Winograd multiplies chunks of images together, and how many depends on the batch; each
    // image's output must still be the same bits alone as in a batch (the sampler's
    // one-seed-per-image guarantee). Deep inputs (C > 512) and two-tile images included.
    let make = formula_tensor;
    for (c, o, h, w) in [
        (16, 16, 8, 8),
        (16, 17, 16, 16),
        (520, 16, 4, 4),
        (1100, 16, 8, 8),
        (2100, 20, 4, 4),
        (16, 16, 2, 4),
        (16, 16, 2, 2),
        (3, 5, 6, 6),
    ] {
        let x = make("x", &[5, c, h, w]);
        let wt = make("w", &[o, c, 3, 3]);
        let all = model::conv2d_same(&x, &wt).unwrap();
        for b in 0..5 {
            let one = model::conv2d_same(&x.narrow(0, b, 1).unwrap(), &wt).unwrap();
            assert_eq!(
                flat(&one),
                flat(&all.narrow(0, b, 1).unwrap()),
                "C {c}, O {o}, {h}x{w}: image {b} alone vs in a batch of 5"
            );
        }
    }
}

#[test]
fn convolution_results_do_not_depend_on_the_thread_count() {
    let make = formula_tensor;
    let run = |threads: usize, [n, c, h, w]: [usize; 4], o: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let x = candle_core::Var::from_tensor(&make("x", &[n, c, h, w])).unwrap();
            let wt = candle_core::Var::from_tensor(&make("w", &[o, c, 3, 3])).unwrap();
            let y = model::conv2d_same(x.as_tensor(), wt.as_tensor()).unwrap();
            let g = (&y * make("r", &[n, o, h, w]))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            [
                &y,
                g.get(x.as_tensor()).unwrap(),
                g.get(wt.as_tensor()).unwrap(),
            ]
            .map(flat)
        })
    };
    for (shape, o) in [
        ([13, 6, 8, 8], 7),
        ([9, 3, 12, 12], 7),
        ([6, 17, 8, 8], 7),
        // Winograd: chunks of 8 images at 8×8; 20 chunks of 2 at 16×16, summed in groups of 2
        // for the weight gradient.
        ([13, 16, 8, 8], 16),
        ([40, 16, 16, 16], 17),
    ] {
        let one = run(1, shape, o);
        assert_eq!(
            one,
            run(3, shape, o),
            "{shape:?}, 1 vs 3 threads: bit-identical output and gradients"
        );
    }
}

#[test]
fn fused_cpu_kernels_match_the_composed_definitions_with_gradients() {
    use model::composed;
    let dev = Device::Cpu;
    let make = |name: &str, shape: &[usize], scale: f64| {
        let n = shape.iter().product();
        Tensor::from_vec(formula::values(name, n, Kind::Sym, scale, 0.0), shape, &dev).unwrap()
    };
    let r = make("r", &[3, 5, 4, 6], 1.0);
    // Gradient of Σ r·f(x) with respect to x, for the fused and the composed f.
    let both = |what: &str,
                x: &Tensor,
                fused: &dyn Fn(&Tensor) -> Tensor,
                reference: &dyn Fn(&Tensor) -> Tensor| {
        let v = candle_core::Var::from_tensor(x).unwrap();
        let (a, b) = (fused(v.as_tensor()), reference(v.as_tensor()));
        check(&format!("{what} forward"), &a, &b, 1e-6);
        let r = r
            .narrow(0, 0, x.dim(0).unwrap())
            .unwrap()
            .reshape(x.shape())
            .unwrap();
        let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        check(
            &format!("{what} gradient"),
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
            1e-5,
        );
    };
    let x = make("x", &[3, 5, 4, 6], 3.0);
    // Pixel norm (channels), whole-slice norm (weights), and a middle range of a 5-d tensor.
    both(
        "normalize dim 1",
        &x,
        &|t| model::normalize(t, Some(&[1])).unwrap(),
        &|t| composed::normalize(t, &[1]).unwrap(),
    );
    both(
        "normalize all but first",
        &x,
        &|t| model::normalize(t, None).unwrap(),
        &|t| composed::normalize(t, &[1, 2, 3]).unwrap(),
    );
    let x5 = make("x5", &[3, 2, 5, 3, 4], 2.0);
    both(
        "normalize dim 2 of 5",
        &x5,
        &|t| model::normalize(t, Some(&[2])).unwrap(),
        &|t| composed::normalize(t, &[2]).unwrap(),
    );
    // All zeros: the norm is ε and the gradient r/ε, as PyTorch's norm (subgradient 0 at 0)
    // gives; the composed version's sqrt has an infinite derivative there (NaN).
    let zeros = candle_core::Var::from_tensor(&x.zeros_like().unwrap()).unwrap();
    let y = model::normalize(zeros.as_tensor(), Some(&[1])).unwrap();
    assert_eq!(flat(&y), vec![0.0; x.elem_count()]);
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    check(
        "normalize zeros gradient",
        g.get(zeros.as_tensor()).unwrap(),
        &(&r / 1e-4).unwrap(),
        1e-6,
    );
    both("mp_silu", &x, &|t| model::mp_silu(t).unwrap(), &|t| {
        composed::mp_silu(t).unwrap()
    });
    // Rows of 6 with values up to ±3 (and the large-value case, shifted by 80).
    both("softmax", &x, &|t| model::softmax_last(t).unwrap(), &|t| {
        composed::softmax_last(t).unwrap()
    });
    // Rows of 24: one full block of the kernels' 16 partial maxima and sums, and a tail.
    let long = x.reshape((3, 5, 24)).unwrap();
    both(
        "softmax rows of 24",
        &long,
        &|t| model::softmax_last(t).unwrap(),
        &|t| composed::softmax_last(t).unwrap(),
    );
    let big = (&x + 80.0).unwrap();
    both(
        "softmax shifted",
        &big,
        &|t| model::softmax_last(t).unwrap(),
        &|t| composed::softmax_last(t).unwrap(),
    );
    // Magnitude-preserving concatenation: gradients for both operands.
    let av = candle_core::Var::from_tensor(&x).unwrap();
    let bv = candle_core::Var::from_tensor(&make("b", &[3, 2, 4, 6], 2.0)).unwrap();
    let a = model::mp_cat(av.as_tensor(), bv.as_tensor(), 0.3).unwrap();
    let b = composed::mp_cat(av.as_tensor(), bv.as_tensor(), 0.3).unwrap();
    assert_eq!(a.dims(), [3, 7, 4, 6]);
    check("mp_cat forward", &a, &b, 1e-6);
    let rc = make("rc", &[3, 7, 4, 6], 1.0);
    let ga = (&a * &rc).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &rc).unwrap().sum_all().unwrap().backward().unwrap();
    for (what, v) in [("first", &av), ("second", &bv)] {
        check(
            &format!("mp_cat gradient of the {what} operand"),
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
            1e-6,
        );
    }
    // The attention core, [N, heads, d, 3, T] → [N, heads, d, T], on normalised q/k/v as the
    // network feeds it (and on raw values, where the scores are larger); 20 positions, so
    // the softmax rows have a full block of 16 lanes and a tail.
    for (what, scale) in [("normalised", 0.0), ("raw", 2.0)] {
        let raw = make(
            "qkv",
            &[2, 3, 4, 3, 20],
            if scale == 0.0 { 1.0 } else { scale },
        );
        let y = if scale == 0.0 {
            model::normalize(&raw, Some(&[2])).unwrap()
        } else {
            raw
        };
        let v = candle_core::Var::from_tensor(&y).unwrap();
        let a = model::attention(v.as_tensor()).unwrap();
        let b = composed::attention(v.as_tensor()).unwrap();
        assert_eq!(a.dims(), [2, 3, 4, 20]);
        check(&format!("attention ({what}) forward"), &a, &b, 1e-6);
        let ro = make("ra", &[2, 3, 4, 20], 1.0);
        let ga = (&a * &ro).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &ro).unwrap().sum_all().unwrap().backward().unwrap();
        check(
            &format!("attention ({what}) gradient"),
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
            1e-5,
        );
    }
    // The whole attention step as a block runs it: the qkv convolution's output [N, 3C, H, W]
    // normalised per head and attended (one fused op), against reshape → composed normalize →
    // composed attention → reshape; 20 positions, 2 heads of 4 channels.
    {
        let v = candle_core::Var::from_tensor(&make("qkv4", &[2, 24, 4, 5], 2.0)).unwrap();
        let a = model::normalized_attention(v.as_tensor(), 2).unwrap();
        let t = v.as_tensor().reshape((2, 2, 4, 3, 20)).unwrap();
        let b = composed::attention(&composed::normalize(&t, &[2]).unwrap())
            .unwrap()
            .reshape((2, 8, 4, 5))
            .unwrap();
        check("normalized attention forward", &a, &b, 1e-6);
        let ro = make("rn", &[2, 8, 4, 5], 1.0);
        let ga = (&a * &ro).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &ro).unwrap().sum_all().unwrap().backward().unwrap();
        check(
            "normalized attention gradient",
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
            1e-5,
        );
    }
    // 2× resampling both ways (candle's upsampling gradient is a grouped convolution).
    for (mode, out) in [
        (model::Resample::Down, [3, 5, 2, 3]),
        (model::Resample::Up, [3, 5, 8, 12]),
    ] {
        let v = candle_core::Var::from_tensor(&x).unwrap();
        let a = model::resample(v.as_tensor(), mode).unwrap();
        let b = composed::resample(v.as_tensor(), mode).unwrap();
        assert_eq!(a.dims(), out);
        check(&format!("{mode:?} forward"), &a, &b, 1e-6);
        let ro = make("ro", &out, 1.0);
        let ga = (&a * &ro).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &ro).unwrap().sum_all().unwrap().backward().unwrap();
        check(
            &format!("{mode:?} gradient"),
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
            1e-6,
        );
    }
    // The embedding modulation: gradients for the activations and for the per-channel scale.
    let yv = candle_core::Var::from_tensor(&x).unwrap();
    let cv = candle_core::Var::from_tensor(&make("c", &[3, 5], 2.0)).unwrap();
    let a = model::modulated_mp_silu(yv.as_tensor(), cv.as_tensor()).unwrap();
    let b = composed::modulated_mp_silu(yv.as_tensor(), cv.as_tensor()).unwrap();
    check("modulated mp_silu forward", &a, &b, 1e-6);
    let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (what, v) in [("activations", &yv), ("scale", &cv)] {
        check(
            &format!("modulated mp_silu gradient of the {what}"),
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
            1e-5,
        );
    }
    // Values beyond the clip bound on both sides.
    both("clip", &x, &|t| model::clip(t, 1.5).unwrap(), &|t| {
        composed::clip(t, 1.5).unwrap()
    });
    let y = make("y", &[3, 5, 4, 6], 1.0);
    let v = candle_core::Var::from_tensor(&y).unwrap();
    both(
        "mp_sum",
        &x,
        &|t| model::mp_sum(t, v.as_tensor(), 0.3).unwrap(),
        &|t| composed::mp_sum(t, v.as_tensor(), 0.3).unwrap(),
    );
    // The sum clipped (a block's end), with sums beyond the bound on both sides: gradients of
    // both operands, zero where the sum was clipped.
    let bv = candle_core::Var::from_tensor(&y).unwrap();
    let xv = candle_core::Var::from_tensor(&x).unwrap();
    let a = model::mp_sum_clip(xv.as_tensor(), bv.as_tensor(), 0.3, Some(2.2)).unwrap();
    let b = composed::clip(
        &composed::mp_sum(xv.as_tensor(), bv.as_tensor(), 0.3).unwrap(),
        2.2,
    )
    .unwrap();
    let clipped = flat(&b).iter().filter(|v| v.abs() >= 2.2).count();
    assert!(
        clipped > 10 && clipped < x.elem_count() / 2,
        "{clipped} clipped"
    );
    check("mp_sum_clip forward", &a, &b, 1e-6);
    let ga = (&a * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let gb = (&b * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (what, v) in [("first", &xv), ("second", &bv)] {
        check(
            &format!("mp_sum_clip gradient of the {what} operand"),
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
            1e-6,
        );
    }
}
