//! The EDM2 training loop: the learning-rate schedule against the reference cases, the
//! procedural dataset, and a tiny model whose loss falls.

use candle_core::{Device, Tensor};
use hindsight::datasets::Procedural;
use hindsight::model::Edm2Config;
use hindsight::train::{learning_rate, TrainConfig, Trainer};

#[test]
fn learning_rate_schedule_matches_the_reference_cases() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/edm2_unet.json"
    ))
    .unwrap();
    let spec: serde_json::Value = serde_json::from_str(&text).unwrap();
    let schedule = &spec["edm2_unet"]["lr_schedule"];
    let cases = schedule["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let got = learning_rate(
            case["cur_nimg"].as_u64().unwrap(),
            case["batch_size"].as_u64().unwrap() as usize,
            schedule["ref_lr"].as_f64().unwrap(),
            schedule["ref_batches"].as_f64().unwrap(),
            schedule["rampup_Mimg"].as_f64().unwrap(),
        );
        let want = case["lr"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-12 * want.abs().max(1e-12),
            "{case}: {got}"
        );
    }
}

#[test]
fn procedural_images_are_deterministic_structured_and_in_range() {
    let data = Procedural {
        resolution: 16,
        classes: 10,
        seed: 7,
    };
    let (a, class_a) = data.image(3);
    let (b, class_b) = data.image(3);
    assert_eq!((a.clone(), class_a), (b, class_b));
    assert_eq!(a.len(), 3 * 16 * 16);
    assert!(a.iter().all(|v| (-1.0..=1.0).contains(v)));
    let (c, _) = data.image(4);
    assert_ne!(a, c);
    // Real structure: many distinct values, but large flat regions (the shape).
    let mut distinct: Vec<i32> = a.iter().map(|v| (v * 1000.0) as i32).collect();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 20, "{}", distinct.len());
    let classes: std::collections::BTreeSet<usize> = (0..200).map(|i| data.image(i).1).collect();
    assert_eq!(classes.len(), 10);
}

fn tiny_config() -> TrainConfig {
    let network: Edm2Config = serde_json::from_value(serde_json::json!({
        "img_resolution": 8, "img_channels": 3, "label_dim": 0,
        "model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1,
        "attn_resolutions": [4], "channels_per_head": 16, "logvar_channels": 8
    }))
    .unwrap();
    let mut config = TrainConfig::new(network, 16);
    config.rampup_mimg = 0.0005; // 500 images
    config.ref_batches = 1000.0;
    config.seed = 1;
    config
}

fn batch(data: &Procedural, start: u64, n: usize) -> Tensor {
    let mut v = Vec::new();
    for i in 0..n as u64 {
        v.extend(data.image(start + i).0);
    }
    let r = data.resolution;
    Tensor::from_vec(v, (n, 3, r, r), &Device::Cpu).unwrap()
}

#[test]
fn a_tiny_model_learns_the_procedural_data() {
    let config = tiny_config();
    let mut trainer = Trainer::new(config.clone(), &Device::Cpu).unwrap();
    let data = Procedural {
        resolution: 8,
        classes: 0,
        seed: 3,
    };
    let mut losses = Vec::new();
    for step in 0..240u64 {
        let images = batch(&data, step * 16, 16);
        let stats = trainer.step(&images, None).unwrap();
        assert!(stats.loss.is_finite());
        losses.push(stats.loss);
    }
    assert_eq!(trainer.cur_nimg, 240 * 16);
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&losses[..40]), mean(&losses[200..]));
    eprintln!("loss per image: first 40 steps {first:.2}, last 40 {last:.2}");
    assert!(
        last < first - 0.1 * first.abs(),
        "loss did not fall: {first} -> {last}"
    );
    // Forced weight normalisation keeps every weight row at unit RMS.
    for (name, var) in &trainer.params {
        if name.ends_with(".weight") {
            let w = var.as_tensor().flatten_from(1).unwrap();
            let rms = w
                .sqr()
                .unwrap()
                .mean(1)
                .unwrap()
                .sqrt()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            // Normalised before the last step's update, which moves them a little.
            assert!(rms.iter().all(|r| (r - 1.0).abs() < 0.2), "{name}: {rms:?}");
        }
    }
}

/// Train → EMA snapshots in the store → post-hoc reconstruction → a network that samples.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_snapshot_reconstruct_and_sample_end_to_end() {
    use hindsight::phema::{PowerEma, Width};
    let dir = tempfile::tempdir().unwrap();
    let data = hindsight::app::DataDir::open(dir.path()).await.unwrap();
    let config = tiny_config();
    let mut trainer = Trainer::new(config.clone(), &Device::Cpu).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let state = trainer.state_dict();
    let names: Vec<String> = state.iter().map(|(n, _)| n.clone()).collect();
    let shapes: Vec<Vec<usize>> = state.iter().map(|(_, t)| t.dims().to_vec()).collect();
    let values: Vec<Vec<f32>> = state.iter().map(|(_, t)| flat(t)).collect();
    let widths = [Width::SigmaRel(0.05), Width::SigmaRel(0.10)];
    let mut ema = PowerEma::new(
        &widths,
        0,
        names
            .iter()
            .map(String::as_str)
            .zip(values.iter().map(Vec::as_slice)),
    )
    .unwrap();
    let meta = serde_json::json!({"network": config.network});
    let writer = hindsight::ingest::SnapshotWriter::new(&data, "e2e", &meta, &ema, &shapes)
        .await
        .unwrap();
    let procedural = Procedural {
        resolution: 8,
        classes: 0,
        seed: 5,
    };
    for step in 0..24u64 {
        let images = batch(&procedural, step * 16, 16);
        tokio::task::block_in_place(|| trainer.step(&images, None)).unwrap();
        let state: Vec<Vec<f32>> = trainer.state_dict().iter().map(|(_, t)| flat(t)).collect();
        let refs: Vec<&[f32]> = state.iter().map(Vec::as_slice).collect();
        ema.update(trainer.cur_nimg, &refs).unwrap();
        if (step + 1) % 8 == 0 {
            writer.write(&ema).await.unwrap();
        }
    }
    let run = data.db.run("e2e").await.unwrap().unwrap();
    assert_eq!(data.db.snapshots(run.id).await.unwrap().len(), 6);

    let targets = vec![hindsight::phema::request::TargetSpec {
        sigma_rel: Some(0.08),
        gamma: None,
        nimg: None,
    }];
    let plan = hindsight::reconstruction::plan(
        &data.db,
        "e2e",
        targets,
        hindsight::materialize::OutDtype::F32,
    )
    .await
    .unwrap();
    let rows = hindsight::reconstruction::materialize_targets(
        &data,
        &plan,
        &[0],
        true,
        std::sync::Arc::new(|_| {}),
    )
    .await
    .unwrap();
    let path = data.store.path(&rows[0].digest.parse().unwrap());
    let weights = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(weights.len(), names.len());
    let vb = candle_nn::VarBuilder::from_tensors(weights, candle_core::DType::F32, &Device::Cpu);
    let net = hindsight::model::Precond::new(vb, &config.network).unwrap();
    let noise = Tensor::randn(0f32, 1f32, (2, 3, 8, 8), &Device::Cpu).unwrap();
    let sampler = hindsight::model::sampler::SamplerConfig {
        num_steps: 4,
        ..Default::default()
    };
    let images =
        hindsight::model::sampler::edm_sampler(&net, &noise, None, &sampler, |_, _| {}).unwrap();
    assert_eq!(images.dims(), &[2, 3, 8, 8]);
    let values = flat(&images);
    assert!(values.iter().all(|v| v.is_finite()));
}

fn png_bytes(w: u32, h: u32, rgb: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header().unwrap().write_image_data(rgb).unwrap();
    }
    out
}

#[test]
fn png_folders_and_zips_in_edm2_layout() {
    use hindsight::datasets::ImageFolder;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ds");
    std::fs::create_dir_all(root.join("00000")).unwrap();
    let mut labels = Vec::new();
    let mut members = Vec::new();
    for i in 0..5u8 {
        let rgb: Vec<u8> = (0..4 * 4 * 3).map(|j| i * 40 + j as u8).collect();
        let name = format!("00000/img{i:08}.png");
        let bytes = png_bytes(4, 4, &rgb);
        std::fs::write(root.join(&name), &bytes).unwrap();
        members.push((name.clone(), bytes));
        labels.push(serde_json::json!([name, i % 3]));
    }
    let json = serde_json::json!({ "labels": labels }).to_string();
    std::fs::write(root.join("dataset.json"), &json).unwrap();
    let folder = ImageFolder::open(&root).unwrap();
    assert_eq!((folder.len(), folder.resolution, folder.classes), (5, 4, 3));
    let (img, class) = folder.image(2);
    assert_eq!(class, 2);
    // Pixel (0, 0) of image 2: R = 80, G = 81, B = 82 → [−1, 1].
    assert!((img[0] - (80.0 / 127.5 - 1.0)).abs() < 1e-6);
    assert!((img[16] - (81.0 / 127.5 - 1.0)).abs() < 1e-6);

    // The same as a stored ZIP, as EDM2's dataset_tool writes it.
    let zip_path = dir.path().join("ds.zip");
    {
        let file = std::fs::File::create(&zip_path).unwrap();
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, bytes) in &members {
            zip.start_file(name.as_str(), options).unwrap();
            std::io::Write::write_all(&mut zip, bytes).unwrap();
        }
        zip.start_file("dataset.json", options).unwrap();
        std::io::Write::write_all(&mut zip, json.as_bytes()).unwrap();
        zip.finish().unwrap();
    }
    let zipped = ImageFolder::open(&zip_path).unwrap();
    assert_eq!((zipped.len(), zipped.classes), (5, 3));
    assert_eq!(zipped.image(4), folder.image(4));

    // Bad inputs: a non-square image; a missing label; nothing at all.
    std::fs::write(root.join("00000/odd.png"), png_bytes(4, 3, &[0; 36])).unwrap();
    let err = ImageFolder::open(&root).unwrap_err().to_string();
    assert!(err.contains("odd.png") && err.contains("square"), "{err}");
    std::fs::remove_file(root.join("00000/odd.png")).unwrap();
    std::fs::write(root.join("00000/extra.png"), png_bytes(4, 4, &[0; 48])).unwrap();
    let err = ImageFolder::open(&root).unwrap_err().to_string();
    assert!(err.contains("no label for 00000/extra.png"), "{err}");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert!(ImageFolder::open(&empty)
        .unwrap_err()
        .to_string()
        .contains("no images found"));
}
