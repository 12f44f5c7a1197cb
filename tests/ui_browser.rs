//! The web UI in a real browser: Debian's headless Chromium driven through `chromedriver`
//! (WebDriver, with `fantoccini`) against a real `hindsight serve` on a data directory holding
//! a small network trained on Fashion-MNIST and a finished sweep (FID and KID over two seed
//! sets, so with error bars).
//!
//! It opens the run page (snapshot timeline, reconstruct panel), the sweep page (every
//! finished point plotted, the best one marked, a point's image grid opened by clicking it on
//! the chart), previews a reconstruction's quality report and profile plot, is refused a
//! reconstruction without the token (clear message in the page), gives the token, reconstructs,
//! downloads the file through the browser and checks its BLAKE3 digest against the API's, and
//! looks at the pages at phone size.
//!
//! An external sweep is worked through the lease protocol (`/evaluations/…`, as a user's
//! evaluator would: images uploaded as NPY, a user metric `val_loss` over two seed sets, one
//! failed attempt, one lease still held); its page shows the user metric's curve under the
//! server's label with the best point, the FID curve, the workers and the failed attempts,
//! and an external sweep nobody works yet shows how to start an evaluator. Screenshots go to `target/tmp/ui-screenshots/` (or
//! `$HINDSIGHT_UI_SCREENSHOTS`).
//!
//! Needs `chromium` and `chromedriver` (Debian: `apt-get install chromium chromium-driver`) and
//! Fashion-MNIST; without them it is skipped with the reason printed, unless
//! `HINDSIGHT_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs them), where it fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, MouseActions, PointerAction, MOUSE_BUTTON_LEFT};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

mod common;
use common::http::exchange;
use common::{hindsight_ok, http, write_fashion_mnist_slice};

const CHROMIUM: &str = "/usr/bin/chromium";

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// chromedriver and Chromium, or `None` with the reason printed (a failure under
/// `HINDSIGHT_REQUIRE_BROWSER=1`).
fn browser() -> Option<PathBuf> {
    let driver = which("chromedriver");
    let reason = match (&driver, Path::new(CHROMIUM).is_file()) {
        (Some(_), true) => return driver,
        (None, _) => "chromedriver is not installed (apt-get install chromium-driver)",
        (_, false) => "Chromium is not at /usr/bin/chromium (apt-get install chromium)",
    };
    if std::env::var("HINDSIGHT_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!("HINDSIGHT_REQUIRE_BROWSER=1 but {reason}");
    }
    eprintln!("SKIPPED: {reason}");
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(addr: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn screenshots_dir() -> PathBuf {
    let dir = std::env::var_os("HINDSIGHT_UI_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.unwrap();
    std::fs::write(screenshots_dir().join(name), png).unwrap();
}

/// Waits up to 60 s for `css` to match an element whose text satisfies `ok`.
async fn wait_text(client: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(el) = client.find(Locator::Css(css)).await {
            if let Ok(text) = el.text().await {
                if ok(&text) {
                    return text;
                }
            }
        }
        if Instant::now() > deadline {
            let text = js(client, "return document.body.innerText;").await;
            panic!(
                "timed out waiting for {css}; the page reads:\n{}",
                text.as_str().unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn js(client: &Client, script: &str) -> Value {
    client.execute(script, vec![]).await.unwrap()
}

/// Clicks the element `css` matches.
async fn click(client: &Client, css: &str) {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Waits until `<img css>` has loaded a picture (natural width > 0) and returns its width.
async fn image_loaded(client: &Client, css: &str) -> u64 {
    let script = format!(
        "const i = document.querySelector({css:?}); return i && i.complete ? i.naturalWidth : 0;"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let w = js(client, &script).await.as_u64().unwrap_or(0);
        if w > 0 {
            return w;
        }
        assert!(Instant::now() < deadline, "{css} never loaded a picture");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_web_ui_in_headless_chromium() {
    let Some(driver) = browser() else { return };
    if !common::fashion_mnist_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The real Inception weights when present (CI), else weights computed by formula: the
    // page does not care which network the numbers came from.
    let weights = common::real_inception_weights().unwrap_or_else(|| {
        let p = dir.path().join("formula-inception.safetensors");
        common::write_formula_inception(&p);
        p
    });
    let weights = weights.to_str().unwrap();
    let data = dir.path().join("data");
    let slice = dir.path().join("fm-slice-images-idx3-ubyte");
    write_fashion_mnist_slice(&slice, 512);
    let network = dir.path().join("net.json");
    std::fs::write(
        &network,
        json!({"img_resolution": 32, "img_channels": 1, "label_dim": 0, "model_channels": 16,
               "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [],
               "logvar_channels": 16})
        .to_string(),
    )
    .unwrap();
    #[rustfmt::skip]
    hindsight_ok(&data, &[
        "train", "--run", "fm", "--dataset", slice.to_str().unwrap(),
        "--network", network.to_str().unwrap(), "--total-kimg", "2", "--snapshot-kimg", "1",
        "--batch", "16",
    ]);
    #[rustfmt::skip]
    hindsight_ok(&data, &[
        "ref-stats", "fashion-mnist-test", "--max-images", "32", "--name", "fm-test",
        "--weights", weights,
    ]);
    #[rustfmt::skip]
    hindsight_ok(&data, &[
        "sweep", "--run", "fm", "--sigma-rel", "0.05,0.08,0.11,0.14", "--metric", "fid,kid",
        "--num-images", "8", "--seed-sets", "2", "--batch", "8", "--steps", "4",
        "--reference", "fm-test", "--weights", weights,
        "--plot", dir.path().join("sweep.svg").to_str().unwrap(),
    ]);
    let tokens = dir.path().join("tokens");
    let token = hindsight_ok(
        &data,
        &["token", "new", "--token-file", tokens.to_str().unwrap()],
    );
    let token = token.trim().to_owned();

    let addr = format!("127.0.0.1:{}", free_port());
    let _server = Process(
        Command::new(env!("CARGO_BIN_EXE_hindsight"))
            .arg("--data-dir")
            .arg(&data)
            .args(["serve", "--addr", &addr, "--token-file"])
            .arg(&tokens)
            .args(["--fid-weights", weights])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(&addr, "hindsight serve");
    let driver_port = free_port();
    let _driver = Process(
        Command::new(driver)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_port(&format!("127.0.0.1:{driver_port}"), "chromedriver");

    let (_, body) = http(&addr, "GET", "/sweeps?run=fm", None, None);
    let sweeps: Value = serde_json::from_str(&body).unwrap();
    let sweep_id = sweeps["sweeps"][0]["id"].as_i64().unwrap();
    let (_, body) = http(&addr, "GET", &format!("/sweeps/{sweep_id}"), None, None);
    let sweep: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sweep["status"], "done", "{sweep}");

    let external = work_external_sweep(&addr, &token);
    let idle = api(
        &addr,
        &token,
        "/sweeps",
        json!({"run": "fm", "evaluator": "external", "sigma_rels": [0.1],
               "metrics": [{"name": "val_loss", "goal": "min"}], "sampler": {}}),
    );

    let downloads = dir.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let sweeps = Sweeps {
        builtin: sweep,
        external,
        idle: idle["id"].as_i64().unwrap(),
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(drive(driver_port, &addr, &token, sweeps, &downloads));
}

/// The sweeps the browser looks at: the builtin one (`GET /sweeps/{id}`), the external one
/// worked by [`work_external_sweep`] (the same), and the id of an external sweep with no
/// evaluator yet.
struct Sweeps {
    builtin: Value,
    external: Value,
    idle: i64,
}

/// `POST path` with `body` and the token; the JSON answer, which must be a success.
fn api(addr: &str, token: &str, path: &str, body: Value) -> Value {
    let (status, text) = http(addr, "POST", path, Some(token), Some(&body.to_string()));
    assert!(
        (200..300).contains(&status),
        "POST {path} {body}: {status} {text}"
    );
    serde_json::from_str(&text).unwrap()
}

/// A `uint8` NPY file of `shape` holding `data`.
fn npy_u8(shape: &[usize], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    hindsight::metrics::npy::write_u8(&mut out, shape, data).unwrap();
    out
}

/// Creates an external sweep of run `fm` (FID and the user metric `val_loss`, "validation
/// loss", over two seed sets of 8 images, in batches of 8) and works it as evaluators would:
/// the first lease is finished, the second fails ("CUDA out of memory"), the third is
/// finished, the fourth is held (heartbeat). Returns `GET /sweeps/{id}` after that.
fn work_external_sweep(addr: &str, token: &str) -> Value {
    #[rustfmt::skip]
    let created = api(addr, token, "/sweeps", json!({
        "run": "fm", "evaluator": "external", "sigma_rels": [0.05, 0.08, 0.11],
        "metrics": ["fid", {"name": "val_loss", "goal": "min", "label": "validation loss"}],
        "reference": "fm-test", "num_images": 8, "seed_sets": 2, "batch": 8,
        "sampler": {"steps": 4, "my_guidance": 1.4},
    }));
    let id = created["id"].as_i64().unwrap();
    assert_eq!(created["spec"]["evaluator"], "external", "{created}");
    let claim = |worker: &str| -> Value {
        api(
            addr,
            token,
            "/evaluations/claim",
            json!({"worker": worker, "sweep": id}),
        )
    };
    let finish = |lease: &Value| {
        let urls = &lease["urls"];
        let idx = lease["point"]["idx"].as_u64().unwrap() as usize;
        let side = lease["images"]["resolution"].as_u64().unwrap_or(32) as usize;
        let channels = lease["images"]["channels"].as_u64().unwrap_or(1) as usize;
        let batch = lease["batch"].as_u64().unwrap() as usize;
        let batches = lease["batches"].as_u64().unwrap();
        assert_eq!(batches, 2, "16 images in batches of 8: {lease}");
        for k in 0..batches {
            let data: Vec<u8> = (0..batch * side * side * channels)
                .map(|i| ((i * 31 + idx * 97 + k as usize * 13) % 251) as u8)
                .collect();
            let body = npy_u8(&[batch, side, side, channels], &data);
            let path = urls["batch"]
                .as_str()
                .unwrap()
                .replace("{k}", &k.to_string());
            let auth = format!("Bearer {token}");
            let reply = exchange(
                addr,
                "POST",
                &path,
                &[
                    ("Authorization", &auth),
                    ("Content-Type", "application/x-npy"),
                ],
                &body,
            );
            assert_eq!(
                reply.status,
                201,
                "batch {k} of point {idx}: {}",
                String::from_utf8_lossy(&reply.body)
            );
        }
        // Point 1 is the best by validation loss.
        let loss = 0.5 + 0.1 * (idx as f64 - 1.0).abs();
        api(
            addr,
            token,
            urls["metrics"].as_str().unwrap(),
            json!({"val_loss": [loss, loss + 0.02]}),
        );
        let point = api(addr, token, urls["finish"].as_str().unwrap(), json!({}));
        assert_eq!(point["status"], "done", "{point}");
    };
    finish(&claim("gpu-a"));
    let failing = claim("gpu-b");
    api(
        addr,
        token,
        failing["urls"]["fail"].as_str().unwrap(),
        json!({"message": "CUDA out of memory"}),
    );
    finish(&claim("gpu-a"));
    let held = claim("gpu-c");
    api(
        addr,
        token,
        held["urls"]["heartbeat"].as_str().unwrap(),
        json!({}),
    );
    let (_, body) = http(addr, "GET", &format!("/sweeps/{id}"), None, None);
    let sweep: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sweep["points_done"], 2, "{sweep}");
    assert_eq!(sweep["workers"].as_array().unwrap().len(), 1, "{sweep}");
    assert_eq!(sweep["failures"].as_array().unwrap().len(), 1, "{sweep}");
    sweep
}

async fn drive(driver_port: u16, addr: &str, token: &str, sweeps: Sweeps, downloads: &Path) {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,800", "--force-device-scale-factor=1"],
            "prefs": {
                "download.default_directory": downloads.to_str().unwrap(),
                "download.prompt_for_download": false,
                "download.directory_upgrade": true,
                "safebrowsing.enabled": false,
            },
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await
        .expect("chromedriver session");
    let result = session(&client, addr, token, &sweeps, downloads).await;
    let _ = client.close().await;
    result
}

async fn session(client: &Client, addr: &str, token: &str, sweeps: &Sweeps, downloads: &Path) {
    let base = format!("http://{addr}/");
    let sweep = &sweeps.builtin;
    let sweep_id = sweep["id"].as_i64().unwrap();

    // Runs: the run with its figures.
    client.goto(&base).await.unwrap();
    let runs = wait_text(client, "#runs tbody", |t| t.contains("fm")).await;
    assert!(runs.contains('4'), "4 snapshots listed: {runs}");
    screenshot(client, "runs.png").await;

    // The sweep: every finished point plotted, the best one marked where the API says.
    client
        .goto(&format!("{base}#/sweeps/{sweep_id}"))
        .await
        .unwrap();
    wait_text(client, "#points tbody", |t| t.contains("done")).await;
    let chart: Value = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = js(
                client,
                "const b = document.querySelector('#chart-fid');
                 return b && b.dataset.points ? {points: JSON.parse(b.dataset.points), best: b.dataset.best} : null;",
            )
            .await;
            if !v.is_null() {
                break v;
            }
            assert!(Instant::now() < deadline, "the FID chart was not drawn");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let api_points = sweep["points"].as_array().unwrap();
    let plotted = chart["points"].as_array().unwrap();
    assert_eq!(
        plotted.len(),
        api_points.len(),
        "every point plotted: {chart}"
    );
    for (p, q) in api_points.iter().zip(plotted) {
        let mean = p["result"]["fid"]["mean"].as_f64().unwrap();
        assert_eq!(q["sigma_rel"].as_f64(), p["sigma_rel"].as_f64());
        assert!((q["value"].as_f64().unwrap() - mean).abs() <= 1e-9 * mean.abs().max(1.0));
        assert!(
            p["result"]["fid"]["std"].as_f64().is_some(),
            "two seed sets give error bars: {p}"
        );
    }
    let best = sweep["best"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["metric"] == "fid")
        .unwrap();
    let best_sigma: f64 = chart["best"].as_str().unwrap().parse().unwrap();
    assert_eq!(best_sigma, best["sigma_rel"].as_f64().unwrap());
    let best_text = wait_text(client, ".best", |t| t.contains("Best FID")).await;
    assert!(
        best_text.contains(&format!("{:.4}", best_sigma)),
        "{best_text}"
    );
    assert!(client.find(Locator::Css("#chart-kid canvas")).await.is_ok());

    // Click the last plotted point on the chart: its image grid opens. (The chart is scrolled
    // into view first: WebDriver offsets are from the centre of the element's visible part.)
    let last = plotted.last().unwrap();
    js(
        client,
        "document.querySelector('#chart-fid .u-over').scrollIntoView({block: 'center'});",
    )
    .await;
    let over = client
        .find(Locator::Css("#chart-fid .u-over"))
        .await
        .unwrap();
    let size = js(
        client,
        "const r = document.querySelector('#chart-fid .u-over').getBoundingClientRect();
         return [r.width, r.height];",
    )
    .await;
    // WebDriver offsets are from the element's centre.
    let dx = last["left"].as_f64().unwrap() - size[0].as_f64().unwrap() / 2.0;
    let dy = last["top"].as_f64().unwrap() - size[1].as_f64().unwrap() / 2.0;
    let press = MouseActions::new("mouse".into())
        .then(PointerAction::MoveToElement {
            element: over,
            duration: Some(Duration::from_millis(50)),
            x: dx.round(),
            y: dy.round(),
        })
        .then(PointerAction::Down {
            button: MOUSE_BUTTON_LEFT,
        })
        .then(PointerAction::Up {
            button: MOUSE_BUTTON_LEFT,
        });
    client.perform_actions(press).await.unwrap();
    let last_idx = api_points.len() - 1;
    let heading = wait_text(client, "#samples h2", |t| {
        t.contains(&format!("{:.4}", last["sigma_rel"].as_f64().unwrap()))
    })
    .await;
    assert!(heading.starts_with("Samples"), "{heading}");
    let src = js(
        client,
        "return document.querySelector('#grid-image').getAttribute('src');",
    )
    .await;
    assert_eq!(
        src.as_str().unwrap(),
        format!("/sweeps/{sweep_id}/points/{last_idx}/grid.png")
    );
    assert!(image_loaded(client, "#grid-image").await > 0);
    let sigmas: Vec<f64> = plotted
        .iter()
        .map(|p| p["sigma_rel"].as_f64().unwrap())
        .collect();
    let drawn = axis_of(client, "fid").await;
    check_axis(&drawn, &sigmas, false);
    check_marks(&drawn, best_sigma, last["sigma_rel"].as_f64().unwrap());
    screenshot(client, "sweep.png").await;
    // The log-scale switch redraws with the same points, on a log axis over the data's
    // range, the best label on its point and the clicked point still marked.
    click(client, "#log-x").await;
    let after = js(
        client,
        "return JSON.parse(document.querySelector('#chart-fid').dataset.points).length;",
    )
    .await;
    assert_eq!(after.as_u64(), Some(plotted.len() as u64));
    let drawn = axis_of(client, "fid").await;
    check_axis(&drawn, &sigmas, true);
    check_marks(&drawn, best_sigma, last["sigma_rel"].as_f64().unwrap());
    screenshot(client, "sweep-log.png").await;
    // Overlays: the external sweep (the same reference, images and seed sets) is offered;
    // the idle one (user metrics only, no images) is not, and the page says why.
    let external_id = sweeps.external["id"].as_i64().unwrap();
    let offered = wait_text(client, "#overlays", |t| t.contains("Overlay")).await;
    assert!(
        offered.contains(&format!("#{external_id} "))
            && !offered.contains(&format!("#{} ", sweeps.idle)),
        "{offered}"
    );
    let hidden = wait_text(client, "#overlays-hidden", |t| !t.is_empty()).await;
    assert!(
        hidden.starts_with("1 other sweep") && hidden.contains("not comparable"),
        "{hidden}"
    );

    external_sweep_page(client, &base, sweeps).await;

    // The run page: timeline drawn, then the solver's preview before committing.
    client.goto(&format!("{base}#/runs/fm")).await.unwrap();
    wait_text(client, "h1", |t| t == "fm").await;
    assert!(client.find(Locator::Css("#timeline canvas")).await.is_ok());
    // The start-sweep form estimates the time from the finished sweep's points, and again
    // when the sweep grows.
    let first = wait_text(client, "#sw-estimate", |t| t.contains("Estimated time ≈")).await;
    assert!(first.contains(&format!("sweep #{sweep_id}")), "{first}");
    let images = client.find(Locator::Css("#sw-images")).await.unwrap();
    images.clear().await.unwrap();
    images.send_keys("5000").await.unwrap();
    let bigger = wait_text(client, "#sw-estimate", |t| {
        t.contains("Estimated time ≈") && t != first
    })
    .await;
    assert!(bigger.contains("25000 images"), "{bigger}");
    js(
        client,
        "document.querySelector('#sweep-form').scrollIntoView({block: 'center'});",
    )
    .await;
    screenshot(client, "sweep-form.png").await;
    let value = client.find(Locator::Css("#rec-value")).await.unwrap();
    value.clear().await.unwrap();
    value.send_keys("0.09").await.unwrap();
    click(client, "#rec-preview").await;
    let report = wait_text(client, "#rec-report", |t| t.contains("profile error")).await;
    assert!(report.contains("0.0900"), "{report}");
    assert!(image_loaded(client, "#rec-profile").await > 100);
    screenshot(client, "preview.png").await;

    let reconstructions = |addr: &str| -> Vec<Value> {
        let (_, body) = http(addr, "GET", "/runs/fm", None, None);
        let detail: Value = serde_json::from_str(&body).unwrap();
        detail["reconstructions"].as_array().unwrap().clone()
    };
    let before = reconstructions(addr).len(); // the sweep's

    // Reconstruct without a token: the dialog asks; cancelling leaves a clear refusal.
    click(client, "#rec-go").await;
    let dialog = wait_text(client, "#token-why", |t| t.contains("token")).await;
    assert!(dialog.contains("needs a token"), "{dialog}");
    click(client, "#token-cancel").await;
    let refusal = wait_text(client, "#rec-out .message", |t| !t.is_empty()).await;
    assert!(
        refusal.contains("Refused") && refusal.contains("token"),
        "{refusal}"
    );
    screenshot(client, "refused.png").await;
    assert_eq!(
        reconstructions(addr).len(),
        before,
        "nothing was reconstructed without the token"
    );

    // Again, giving the token: reconstructed, then downloaded by the browser.
    click(client, "#rec-go").await;
    wait_text(client, "#token-why", |t| t.contains("token")).await;
    client
        .find(Locator::Css("#token-input"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    click(client, "#token-save").await;
    let digest = wait_text(client, "#rec-digest", |t| t.len() == 64).await;
    let after = reconstructions(addr);
    assert_eq!(after.len(), before + 1);
    let stored = after
        .iter()
        .find(|r| r["digest"].as_str() == Some(digest.as_str()))
        .expect("the page shows the digest of the new reconstruction");
    assert_eq!(stored["sigma_rel"].as_f64(), Some(0.09));
    let file_name = stored["file_name"].as_str().unwrap().to_owned();
    click(client, "#rec-download").await;
    let file = downloads.join(&file_name);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !file.is_file() {
        assert!(
            Instant::now() < deadline,
            "the browser did not download {file_name}; {:?}",
            std::fs::read_dir(downloads).map(|d| d.count())
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(
        blake3::hash(&bytes).to_hex().as_str(),
        digest,
        "the downloaded file's BLAKE3 is the digest the API reports"
    );
    screenshot(client, "reconstructed.png").await;

    // Phone-sized: the run and sweep pages still fit (no horizontal scrolling of the page).
    client.set_window_size(390, 844).await.unwrap();
    let external_id = sweeps.external["id"].as_i64().unwrap();
    for page in [
        "#/runs/fm".to_owned(),
        format!("#/sweeps/{sweep_id}"),
        format!("#/sweeps/{external_id}"),
    ] {
        client.goto(&format!("{base}{page}")).await.unwrap();
        wait_text(client, "h1", |t| !t.is_empty() && t != "Loading…").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let overflow = js(
            client,
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
        )
        .await;
        if overflow.as_i64().unwrap_or(1) > 0 {
            let wide = js(
                client,
                "return [...document.querySelectorAll('body *')]
                   .filter((e) => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
                   .slice(0, 8).map((e) => e.tagName + '#' + e.id + '.' + e.className + ' ' +
                     Math.round(e.getBoundingClientRect().right));",
            )
            .await;
            panic!("{page} scrolls sideways at 390 px by {overflow} px: {wide}");
        }
    }
    screenshot(client, "sweep-phone.png").await;
}

/// The σ_rel axis and the marks of chart `#chart-METRIC` as drawn: `{range, ticks, points,
/// best, label, selected}` (see `chart.js`, `curve`).
async fn axis_of(client: &Client, metric: &str) -> Value {
    let script = format!(
        "const b = document.querySelector('#chart-{metric}');
         const j = (t) => (t ? JSON.parse(t) : null);
         return {{range: j(b.dataset.xRange), ticks: j(b.dataset.xTicks), points: j(b.dataset.points),
                  best: b.dataset.best, label: j(b.dataset.bestLabel), selected: j(b.dataset.selected)}};"
    );
    js(client, &script).await
}

/// The σ_rel axis spans the data (padded at most ×/÷1.5, below 0.5 on a log axis) and its
/// tick labels are numbers within it, all written with the same decimals on a linear axis.
#[track_caller]
fn check_axis(drawn: &Value, sigmas: &[f64], log: bool) {
    let lo = sigmas.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = sigmas.iter().cloned().fold(0.0, f64::max);
    let range = drawn["range"]
        .as_array()
        .unwrap_or_else(|| panic!("{drawn}"));
    let (min, max) = (range[0].as_f64().unwrap(), range[1].as_f64().unwrap());
    assert!(
        min <= lo && max >= hi,
        "the axis shows every point: {drawn}"
    );
    if log {
        assert!(min >= lo / 1.5 && max <= hi * 1.5 && max < 0.5, "{drawn}");
    }
    let labels: Vec<&str> = drawn["ticks"]
        .as_array()
        .unwrap_or_else(|| panic!("{drawn}"))
        .iter()
        .map(|t| t.as_str().unwrap())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(labels.len() >= 2, "at least two ticks: {drawn}");
    for label in &labels {
        let v: f64 = label
            .parse()
            .unwrap_or_else(|_| panic!("tick {label:?} is not a number: {drawn}"));
        assert!(
            v >= min - 1e-9 && v <= max + 1e-9,
            "tick {v} outside the axis: {drawn}"
        );
    }
    if !log {
        let decimals = |t: &str| t.split('.').nth(1).map_or(0, str::len);
        assert!(
            labels.iter().all(|t| decimals(t) == decimals(labels[0])),
            "{labels:?}"
        );
    }
}

/// The best label sits on the best point (its span covers the point's x, close above or
/// below it) and the clicked point is the one marked.
#[track_caller]
fn check_marks(drawn: &Value, best_sigma: f64, clicked_sigma: f64) {
    let point = |sigma: f64| {
        drawn["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["sigma_rel"].as_f64() == Some(sigma))
            .unwrap_or_else(|| panic!("no point at {sigma}: {drawn}"))
            .clone()
    };
    let best = point(best_sigma);
    let label = &drawn["label"];
    let (left, top, width) = (
        label["left"].as_f64().unwrap_or_else(|| panic!("{drawn}")),
        label["top"].as_f64().unwrap(),
        label["width"].as_f64().unwrap(),
    );
    let x = best["left"].as_f64().unwrap();
    assert!(
        (left - x).abs() <= width / 2.0,
        "the best label spans its point's x: {drawn}"
    );
    // Beneath the point and its error bar (FID: lower is better), not far.
    let below = top - best["top"].as_f64().unwrap();
    assert!(
        below > 0.0 && below <= 120.0,
        "the best label is under its point: {drawn}"
    );
    // No other point is nearer the label's centre than the best one.
    for p in drawn["points"].as_array().unwrap() {
        let other = (p["left"].as_f64().unwrap() - left).abs();
        assert!(
            other >= (x - left).abs(),
            "the best label is nearer {p} than its own point: {drawn}"
        );
    }
    assert!(
        label["text"]
            .as_str()
            .unwrap()
            .ends_with(&format!("{best_sigma}")),
        "{drawn}"
    );
    let selected = &drawn["selected"];
    assert_eq!(
        selected["sigma_rel"].as_f64(),
        Some(clicked_sigma),
        "{drawn}"
    );
    let clicked = point(clicked_sigma);
    assert_eq!(selected["left"], clicked["left"], "{drawn}");
}

/// What a chart box (`#chart-METRIC`) shows once drawn: its plotted points, the best σ_rel and
/// the value axis' label.
async fn chart_of(client: &Client, metric: &str) -> Value {
    let script = format!(
        "const b = document.querySelector('#chart-{metric}');
         return b && b.dataset.points
           ? {{points: JSON.parse(b.dataset.points), best: b.dataset.best, y: b.dataset.yLabel}}
           : null;"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = js(client, &script).await;
        if !v.is_null() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the {metric} chart was not drawn"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The external sweep's page: the user metric's curve under the server's label with its best
/// point and error bars, FID beside it, the evaluator, the worker holding a lease, the failed
/// attempt, a point's image grid; then the idle external sweep's hint.
async fn external_sweep_page(client: &Client, base: &str, sweeps: &Sweeps) {
    let sweep = &sweeps.external;
    let id = sweep["id"].as_i64().unwrap();
    client.goto(&format!("{base}#/sweeps/{id}")).await.unwrap();
    wait_text(client, "#points tbody", |t| t.contains("done")).await;
    let evaluator = wait_text(client, "#evaluator", |t| !t.is_empty()).await;
    assert!(evaluator.contains("external"), "{evaluator}");

    // The user metric: labelled and directed as the server says, every finished point
    // plotted at its value, the best where the API puts it.
    let info = sweep["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "val_loss")
        .unwrap_or_else(|| panic!("no val_loss in Sweep.metrics: {sweep}"));
    assert_eq!(info["kind"], "user");
    let label = info["label"].as_str().unwrap();
    assert_eq!(label, "validation loss");
    let chart = chart_of(client, "val_loss").await;
    let y = chart["y"].as_str().unwrap();
    assert!(
        y.starts_with(info["axis_label"].as_str().unwrap()) && y.contains("lower is better"),
        "{chart}"
    );
    let headings = js(
        client,
        "return [...document.querySelectorAll('#charts h2')].map((e) => e.textContent);",
    )
    .await;
    assert!(
        headings
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h.as_str().unwrap().starts_with(label)),
        "{headings}"
    );
    let done: Vec<&Value> = sweep["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"] == "done")
        .collect();
    let plotted = chart["points"].as_array().unwrap();
    assert_eq!(plotted.len(), done.len(), "{chart}");
    for (p, q) in done.iter().zip(plotted) {
        let v = &p["result"]["metrics"]["val_loss"];
        assert_eq!(q["sigma_rel"].as_f64(), p["sigma_rel"].as_f64());
        let value = v["value"].as_f64().unwrap();
        assert!(
            (q["value"].as_f64().unwrap() - value).abs() <= 1e-9,
            "{q} {v}"
        );
        assert!(v["error_bar"].as_f64().unwrap() > 0.0, "two seed sets: {v}");
    }
    let best = sweep["best"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["metric"] == "val_loss")
        .unwrap_or_else(|| panic!("no best val_loss: {sweep}"));
    let best_sigma = best["sigma_rel"].as_f64().unwrap();
    let shown: f64 = chart["best"].as_str().unwrap().parse().unwrap();
    assert_eq!(shown, best_sigma);
    let best_text = wait_text(client, "#main", |t| t.contains("Best validation loss")).await;
    let line = best_text
        .lines()
        .find(|l| l.contains("Best validation loss"))
        .unwrap();
    assert!(
        line.contains(&format!(
            "{:.3}",
            best["value"].as_f64().unwrap() * info["scale"].as_f64().unwrap()
        )) && line.contains('±')
            && line.contains(&format!("{best_sigma:.4}")),
        "{line}"
    );
    chart_of(client, "fid").await;
    let table = wait_text(client, "#points thead", |t| !t.is_empty()).await;
    assert!(
        table.contains("validation loss") && table.contains("FID"),
        "{table}"
    );

    // Workers and failed attempts, as the API lists them.
    let worker = &sweep["workers"][0];
    let workers = wait_text(client, "#workers tbody", |t| !t.is_empty()).await;
    assert!(
        workers.contains("gpu-c")
            && workers.contains(&format!("#{}", worker["idx"]))
            && workers.contains("ago"),
        "{workers}"
    );
    let failure = &sweep["failures"][0];
    let failures = wait_text(client, "#failures tbody", |t| !t.is_empty()).await;
    assert!(
        failures.contains("gpu-b")
            && failures.contains("CUDA out of memory")
            && failures.contains(failure["outcome"].as_str().unwrap())
            && failures.contains(&format!("#{}", failure["idx"])),
        "{failures}"
    );
    let running = wait_text(client, "#points tbody", |t| t.contains("running")).await;
    assert!(running.contains("gpu-c"), "{running}");
    assert!(client.find(Locator::Css("#worker-hint")).await.is_err());

    // A finished point's image grid (batch 0's uploaded images).
    let p = done[0];
    click(
        client,
        &format!(
            "#points tbody tr:nth-child({}) button",
            p["idx"].as_u64().unwrap() + 1
        ),
    )
    .await;
    wait_text(client, "#samples h2", |t| {
        t.contains(&format!("{:.4}", p["sigma_rel"].as_f64().unwrap()))
    })
    .await;
    assert!(image_loaded(client, "#grid-image").await > 0);
    screenshot(client, "sweep-external.png").await;

    // An external sweep nobody works yet: how to start an evaluator.
    client
        .goto(&format!("{base}#/sweeps/{}", sweeps.idle))
        .await
        .unwrap();
    let hint = wait_text(client, "#worker-hint", |t| !t.is_empty()).await;
    assert!(
        hint.contains(&format!("evaluate(sweep={}", sweeps.idle)) && hint.contains("Client("),
        "{hint}"
    );
    screenshot(client, "sweep-external-idle.png").await;

    // The runs page marks external sweeps.
    client.goto(base).await.unwrap();
    let listed = wait_text(client, "table.sweeps tbody", |t| t.contains("external")).await;
    assert!(listed.contains(&format!("#{id}")), "{listed}");
}
