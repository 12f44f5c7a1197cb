//! `hindsight train`, `reconstruct` and `generate` end to end on the command line.

use std::path::Path;
use std::process::{Command, Output};

fn hindsight(data: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hindsight {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn png_size(path: &Path) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[test]
fn train_reconstruct_generate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let network = dir.path().join("net.json");
    std::fs::write(
        &network,
        r#"{"img_resolution": 8, "img_channels": 3, "label_dim": 3, "model_channels": 8,
            "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [4],
            "channels_per_head": 8, "logvar_channels": 8}"#,
    )
    .unwrap();
    let network = network.to_str().unwrap();
    hindsight(
        &data,
        &[
            "train",
            "--run",
            "tiny",
            "--network",
            network,
            "--resolution",
            "8",
            "--classes",
            "3",
            "--batch",
            "8",
            "--total-kimg",
            "1",
            "--snapshot-kimg",
            "1",
        ],
    );
    let stats = std::fs::read_to_string(data.join("training/tiny/stats.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(stats.lines().next().unwrap()).unwrap();
    assert_eq!(line["nimg"], 1000);
    assert!(line["loss_mean"].as_f64().unwrap().is_finite());
    assert!(line["images_per_sec"].as_f64().unwrap() > 0.0);
    assert!(data.join("training/tiny/checkpoint.safetensors").is_file());
    let listed = hindsight(&data, &["snapshots", "tiny", "--json"]);
    let snaps: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 2, "{snaps}"); // σ_rel 0.05 and 0.10 at 1000 images
    let out = dir.path().join("weights");
    hindsight(
        &data,
        &[
            "reconstruct",
            "--run",
            "tiny",
            "--sigma-rel",
            "0.08",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let weights = out.join("tiny-0000001000-0.080.safetensors");
    assert!(weights.is_file());

    // The network configuration comes from the run's metadata.
    let images = dir.path().join("images");
    let w = weights.to_str().unwrap();
    hindsight(
        &data,
        &[
            "generate",
            "--weights",
            w,
            "--seeds",
            "0-4",
            "--steps",
            "4",
            "--batch",
            "3",
            "--out",
            images.to_str().unwrap(),
        ],
    );
    for seed in 0..5 {
        let (width, height, _) = png_size(&images.join(format!("{seed:06}.png")));
        assert_eq!((width, height), (8, 8));
    }
    let (gw, gh, _) = png_size(&images.join("grid.png"));
    assert_eq!((gw, gh), (24, 16)); // 3 × 2 cells of 8 pixels
                                    // An image depends only on its seed, not on its batch.
    let alone = dir.path().join("alone");
    hindsight(
        &data,
        &[
            "generate",
            "--weights",
            w,
            "--seeds",
            "3",
            "--steps",
            "4",
            "--out",
            alone.to_str().unwrap(),
        ],
    );
    assert_eq!(
        png_size(&images.join("000003.png")).2,
        png_size(&alone.join("000003.png")).2
    );
}

/// Writes `count` greyscale `side`×`side` PNGs (a bright square on a dark ground, moving with
/// the index) into `dir`.
fn write_grey_pngs(dir: &Path, count: usize, side: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for k in 0..count {
        let mut pixels = vec![20u8; side * side];
        let (x0, y0) = (k % (side / 2), (k / 3) % (side / 2));
        for y in y0..y0 + side / 2 {
            for x in x0..x0 + side / 2 {
                pixels[y * side + x] = 230;
            }
        }
        let file = std::fs::File::create(dir.join(format!("{k:05}.png"))).unwrap();
        let mut encoder = png::Encoder::new(file, side as u32, side as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .write_header()
            .unwrap()
            .write_image_data(&pixels)
            .unwrap();
    }
}

#[test]
fn an_unconditional_greyscale_network_trains_and_generates() {
    // Fashion-MNIST's shape: one channel, no labels. The default network follows the data.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let images = dir.path().join("grey");
    write_grey_pngs(&images, 24, 8);
    hindsight(
        &data,
        &[
            "train",
            "--run",
            "grey",
            "--dataset",
            images.to_str().unwrap(),
            "--batch",
            "8",
            "--total-kimg",
            "1",
            "--snapshot-kimg",
            "1",
        ],
    );
    let runs: serde_json::Value =
        serde_json::from_slice(&hindsight(&data, &["snapshots", "grey", "--json"]).stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 2);
    let out = dir.path().join("weights");
    hindsight(
        &data,
        &[
            "reconstruct",
            "--run",
            "grey",
            "--sigma-rel",
            "0.08",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let samples = dir.path().join("samples");
    hindsight(
        &data,
        &[
            "generate",
            "--weights",
            out.join("grey-0000001000-0.080.safetensors")
                .to_str()
                .unwrap(),
            "--seeds",
            "0-3",
            "--steps",
            "4",
            "--out",
            samples.to_str().unwrap(),
        ],
    );
    // One byte per pixel: greyscale PNGs, 8×8, and a 2×2 grid.
    let (w, h, pixels) = png_size(&samples.join("000002.png"));
    assert_eq!((w, h, pixels.len()), (8, 8, 64));
    let (w, h, pixels) = png_size(&samples.join("grid.png"));
    assert_eq!((w, h, pixels.len()), (16, 16, 256));
}

#[test]
fn generate_refuses_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(&data)
        .args(["generate", "--out", dir.path().join("x").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--weights"));
}

#[test]
fn a_resumed_run_continues_exactly_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let network = dir.path().join("net.json");
    std::fs::write(
        &network,
        r#"{"img_resolution": 8, "img_channels": 3, "label_dim": 0, "model_channels": 8,
            "channel_mult": [1], "num_blocks": 1, "attn_resolutions": [],
            "logvar_channels": 8}"#,
    )
    .unwrap();
    let common = |run: &'static str, kimg: &'static str| {
        vec![
            "train",
            "--run",
            run,
            "--network",
            network.to_str().unwrap().to_owned().leak(),
            "--resolution",
            "8",
            "--batch",
            "8",
            "--total-kimg",
            kimg,
            "--snapshot-kimg",
            "1",
        ]
    };
    hindsight(&data, &common("straight", "2"));
    hindsight(&data, &common("resumed", "1"));
    let mut again = common("resumed", "2");
    again.push("--resume");
    hindsight(&data, &again);
    let digests = |run: &str| -> Vec<(u64, f64, String)> {
        let out = hindsight(&data, &["snapshots", run, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["nimg"].as_u64().unwrap(),
                    s["sigma_rel"].as_f64().unwrap(),
                    s["digest"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let straight = digests("straight");
    assert_eq!(straight.len(), 4);
    assert_eq!(
        straight,
        digests("resumed"),
        "bit-identical snapshots after resuming"
    );
}

#[test]
fn bench_parity_and_bench_conv_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Every fixture comparison within tolerance (exit 0), including the float64 reference run.
    let out = hindsight(&data, &["bench", "parity"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("grad/* vs float64, ours"), "{text}");
    assert!(text.contains("grad/* vs float64, the fixture's"), "{text}");
    assert!(!text.contains("FAIL"), "{text}");
    // The unconditional greyscale network too (no class labels in its fixture).
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let out = hindsight(
        &data,
        &[
            "bench",
            "parity",
            "--fixture",
            fixtures
                .join("edm2_unet_uncond-gray.safetensors")
                .to_str()
                .unwrap(),
            "--fixture-json",
            fixtures
                .join("edm2_unet_uncond-gray.json")
                .to_str()
                .unwrap(),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("edm2_unet_uncond-gray"), "{text}");
    assert!(
        text.contains("sampler/samples") && !text.contains("FAIL"),
        "{text}"
    );
    // Both convolution algorithms, each 3×3 shape of the bench network, and the totals.
    let out = hindsight(
        &data,
        &[
            "bench",
            "conv",
            "--batch",
            "2",
            "--iterations",
            "1",
            "--rounds",
            "1",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text.lines().filter(|l| l.contains(" ms ")).collect();
    assert_eq!(rows.len(), 11, "{text}");
    assert!(rows[0].contains("(direct either way)") && rows[1].contains("2 x 32 -> 32, 16x16"));
    assert!(rows[10].trim_start().starts_with("total"), "{text}");
    // Given shapes instead; a malformed one is refused with the reason.
    let out = hindsight(
        &data,
        &[
            "bench",
            "conv",
            "--iterations",
            "1",
            "--rounds",
            "1",
            "--shape",
            "1,16,16,4",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 x 16 -> 16, 4x4"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .args(["bench", "conv", "--shape", "1,16,16"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected N,C,O,H"), "{err}");
}

/// Off a terminal (stderr captured, as in a log file or under a service manager), long work
/// prints a plain progress line every `HINDSIGHT_PROGRESS_SECS` (15 by default): stage,
/// done/total, rate, ETA.
#[test]
fn progress_goes_to_logs_as_plain_lines_off_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hindsight"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args([
            "train",
            "--run",
            "logged",
            "--resolution",
            "8",
            "--total-kimg",
            "2",
            "--snapshot-kimg",
            "1",
        ])
        .env("HINDSIGHT_PROGRESS_SECS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("[training] "))
        .collect();
    assert!(!lines.is_empty(), "no progress lines in: {stderr}");
    for line in &lines {
        assert!(line.contains("/2000 img ("), "{line}");
        assert!(
            !line.contains('█') && !line.contains('\r'),
            "plain text: {line:?}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains(" img/s, ETA ")),
        "rate and ETA: {lines:?}"
    );
}
