//! The `hindsight` command line.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use hindsight::bench::{edm2_schedule, sigma_sweep, Timing};
use hindsight::phema::request::{SnapshotSpec, SolveRequest, SolveResponse, TargetSpec};
use hindsight::phema::{self, SolveOptions, Width};

mod generate_command;
mod store_commands;
mod train_command;

/// Post-hoc EMA of neural-network weights (EDM2): reconstruct any EMA length after training.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Where hindsight keeps its SQLite index and snapshot store.
    #[arg(
        long,
        global = true,
        env = "HINDSIGHT_DATA_DIR",
        default_value = "./hindsight-data"
    )]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Solve for post-hoc EMA coefficients: reads a JSON request on stdin, writes JSON on stdout.
    ///
    /// Input: {"snapshots": [{"nimg": N, "sigma_rel": S}, ...], "targets": [{"sigma_rel": S,
    /// "nimg": N?} | {"gamma": G, "nimg": N?}, ...], "profile_points": P?}.
    /// Target nimg defaults to the last snapshot. Errors exit non-zero with one line on stderr
    /// naming the bad field.
    Solve {
        /// Print a table for people instead of JSON.
        #[arg(long)]
        table: bool,
        /// Targets on the command line (replacing the request's "targets", which may then be
        /// omitted).
        #[command(flatten)]
        targets: TargetArgs,
        /// Also draw each target's profile beside its reconstruction into this SVG file.
        #[arg(long, value_name = "FILE")]
        plot: Option<PathBuf>,
        /// Take the snapshots from this stored run (in `hindsight snapshots RUN` order) instead
        /// of reading a request on stdin; targets come from --sigma-rel/--gamma.
        #[arg(long, value_name = "RUN")]
        run: Option<String>,
    },
    /// Measure performance against the peers (see BENCHMARKS.md).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Import a directory of safetensors snapshots into a run (created if new).
    ///
    /// Each file's training time and EMA width come from its __metadata__ (nimg, and sigma_rel
    /// or gamma) or from an EDM2 file name, <prefix>-<kimg:07d>-<sigma:.3f>.safetensors.
    /// Re-importing the same files is a no-op; a different file at a stored (nimg, sigma_rel)
    /// is refused, as is any file whose tensors differ from the run's.
    Import {
        /// Directory holding the snapshot files.
        dir: PathBuf,
        /// Run to import into.
        #[arg(long)]
        run: String,
        /// Refuse files whose floating-point tensors hold NaN or Inf.
        #[arg(long)]
        check_finite: bool,
        /// `safetensors` (EDM2 names or metadata) or `ema-pytorch` (PostHocEMA checkpoint
        /// folders: {index}.{step}.pt).
        #[arg(long, value_enum, default_value_t = store_commands::Format::Safetensors)]
        format: store_commands::Format,
        /// ema-pytorch: the sigma_rels of the EMA indices, in order (e.g. 0.05,0.28).
        #[arg(long, value_name = "LIST")]
        sigma_rels: Option<String>,
        /// ema-pytorch: training images per EMA step (time = step × this).
        #[arg(long, value_name = "N")]
        images_per_step: Option<u64>,
    },
    /// Reconstruct EMA weights from a stored run: one safetensors file per target in --out,
    /// named <run>-<nimg>-<sigma_rel:.3f>.safetensors, with the quality report printed.
    Reconstruct {
        /// The run.
        #[arg(long)]
        run: String,
        /// The targets.
        #[command(flatten)]
        targets: TargetArgs,
        /// Element type of the reconstructed floating-point tensors.
        #[arg(long, value_enum, default_value_t = store_commands::Dtype::F32)]
        dtype: store_commands::Dtype,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The quality report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Do not hash the snapshots while reading them (faster; damage then goes unnoticed
        /// until `hindsight verify`).
        #[arg(long)]
        no_verify: bool,
        /// Compute even when the store already holds the reconstruction.
        #[arg(long)]
        recompute: bool,
        /// Write independent copies instead of hard links to the store's read-only files.
        #[arg(long)]
        copy: bool,
        /// Print the process's peak resident memory to stderr at the end (benchmarks).
        #[arg(long, hide = true)]
        report_peak_rss: bool,
    },
    /// The main job on a fresh machine: generate an EDM2-shaped run of synthetic fp16
    /// snapshots (σ_rel 0.05 and 0.10 every 8Mi images), import it into the data directory,
    /// reconstruct EMA lengths 0.050–0.250 into --out, print the quality report, and say how
    /// to serve the result.
    Demo {
        /// Parameters per snapshot.
        #[arg(long, default_value_t = 2_000_000)]
        params: u64,
        /// Snapshots (half at each width).
        #[arg(long, default_value_t = 32)]
        snapshots: usize,
        /// Where the reconstructed weights go.
        #[arg(long, default_value = "reconstructions")]
        out: PathBuf,
    },
    /// Train an EDM2 network on the built-in procedural dataset, writing power-function EMA
    /// snapshots (σ_rel 0.05 and 0.10 by default) into the store as a run.
    Train(train_command::TrainArgs),
    /// Generate images with EDM's Heun sampler from weights (a file or a stored
    /// reconstruction): one PNG per seed plus grid.png.
    Generate(generate_command::GenerateArgs),
    /// Serve the HTTP API (reconstruct, download, upload, listings; see /openapi.json).
    Serve {
        /// Address to listen on. Anything but loopback needs --token-file (or
        /// --insecure-no-auth).
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        /// File of accepted token hashes, one `blake3:<hex>` per line (see `hindsight token
        /// new`). With tokens, every request that is not GET or HEAD needs `Authorization:
        /// Bearer <token>`.
        #[arg(long, env = "HINDSIGHT_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// Allow a non-loopback address without tokens.
        #[arg(long)]
        insecure_no_auth: bool,
        /// Largest snapshot upload, in bytes.
        #[arg(long, default_value_t = 64 << 30)]
        max_upload_bytes: u64,
        /// Uploads processed at once.
        #[arg(long, default_value_t = 4)]
        upload_concurrency: usize,
        /// How long POST /reconstruct waits before answering 202 with a status URL.
        #[arg(long, default_value_t = 60.0)]
        reconstruct_wait_secs: f64,
        /// Do not hash snapshots while materializing, nor downloads while sending them.
        #[arg(long)]
        no_verify: bool,
    },
    /// Manage API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// List runs.
    Runs {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List a run's snapshots.
    Snapshots {
        /// The run.
        run: String,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every stored blob and report mismatches and missing files.
    Verify,
    /// Delete blobs no snapshot references (and orphaned temporary files).
    Gc {
        /// Leave pending blobs (ingests in progress) younger than this alone.
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
}

/// Targets given on the command line, in EDM2's list syntax.
#[derive(clap::Args)]
struct TargetArgs {
    /// Target widths as a list, e.g. `0.010,0.015,...,0.250`.
    #[arg(long, value_name = "LIST")]
    sigma_rel: Option<String>,
    /// Target widths as exponents γ, same list syntax (combined with --sigma-rel).
    #[arg(long, value_name = "LIST")]
    gamma: Option<String>,
    /// Training time of these targets (default: the last snapshot).
    #[arg(long, value_name = "NIMG")]
    at_nimg: Option<u64>,
}

impl TargetArgs {
    fn given(&self) -> bool {
        self.sigma_rel.is_some() || self.gamma.is_some()
    }

    /// The targets, validated; empty when none were given.
    fn parse(&self) -> anyhow::Result<Vec<TargetSpec>> {
        let mut targets = Vec::new();
        if let Some(list) = &self.sigma_rel {
            for v in phema::parse_sigma_rel_list(list).context("--sigma-rel")? {
                targets.push(TargetSpec {
                    sigma_rel: Some(v),
                    gamma: None,
                    nimg: self.at_nimg,
                });
            }
        }
        if let Some(list) = &self.gamma {
            for v in phema::parse_float_list(list).context("--gamma")? {
                targets.push(TargetSpec {
                    sigma_rel: None,
                    gamma: Some(v),
                    nimg: self.at_nimg,
                });
            }
        }
        Ok(targets)
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a new random token: prints it once on stdout and appends only its hash to the
    /// token file (created if missing).
    New {
        /// The token file `hindsight serve --token-file` reads.
        #[arg(long, env = "HINDSIGHT_TOKEN_FILE")]
        token_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time `hindsight import` of generated fp16 snapshots against `cp` of the same files.
    Import {
        /// Where to generate the snapshots and the copies (needs about 3x their size free).
        #[arg(long)]
        dir: PathBuf,
        /// Number of snapshots.
        #[arg(long, default_value_t = 48)]
        snapshots: usize,
        /// Parameters per snapshot.
        #[arg(long, default_value_t = 34_000_000)]
        params: u64,
        /// Timed rounds after the warm-up round (they alternate which side goes first).
        #[arg(long, default_value_t = 4)]
        rounds: usize,
    },
    /// Time `reconstruct` of one and of eight σ_rel from generated fp16 snapshots against `cat`
    /// of the same files (and EDM2's algorithm in NumPy with --peer-python).
    Reconstruct {
        /// Where to keep the generated snapshots and their data directory (reused when present).
        #[arg(long)]
        dir: PathBuf,
        /// Number of snapshots.
        #[arg(long, default_value_t = 48)]
        snapshots: usize,
        /// Parameters per snapshot.
        #[arg(long, default_value_t = 34_000_000)]
        params: u64,
        /// Timed rounds (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Python with NumPy for scripts/peer_reconstruct.py.
        #[arg(long)]
        peer_python: Option<String>,
    },
    /// Time the EDM2 network's forward pass and training step (the reference fixture's
    /// configuration).
    Train {
        /// Images per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Timed repetitions.
        #[arg(long, default_value_t = 5)]
        iterations: usize,
        /// Python with PyTorch: also time scripts/peer_edm2_torch.py (the same network in
        /// PyTorch, checked against the reference fixture first) with the same batch, thread
        /// count and device, and print the ratios.
        #[arg(long)]
        peer_python: Option<String>,
        /// Rounds of both sides, alternating which goes first (with a peer): the ratios are
        /// taken per round and their median printed, so load that comes and goes on a shared
        /// machine hits both sides alike.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Time each 3×3 convolution shape of the `bench train` network (forward, and forward with
    /// both gradients) on the CPU with the direct GEMM path and with Winograd's F(2×2, 3×3),
    /// side by side in one run.
    Conv {
        /// Images per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Timed repetitions per layer, algorithm and round.
        #[arg(long, default_value_t = 15)]
        iterations: usize,
        /// Rounds, alternating which algorithm goes first; medians over all.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Time this shape instead, `N,C,O,H` (images, input and output channels, square
        /// size); repeatable. E.g. EDM2-S layers: `--shape 8,192,192,64 --shape 32,768,768,8`.
        #[arg(long = "shape", value_parser = parse_conv_shape)]
        shapes: Vec<[usize; 4]>,
    },
    /// Check the EDM2 network on the device this binary computes on (CUDA when built with
    /// the `cuda` feature and a GPU is present) against the reference fixture: forward pass,
    /// sampler, forced weight normalisation, loss and every gradient. Exits 1 when any is
    /// outside its tolerance.
    Parity {
        /// The fixture tensors (default: $HINDSIGHT_EDM2_FIXTURE, else
        /// tests/fixtures/edm2_unet.safetensors).
        #[arg(long)]
        fixture: Option<PathBuf>,
        /// Its JSON description (default: $HINDSIGHT_EDM2_FIXTURE_JSON, else
        /// tests/fixtures/edm2_unet.json).
        #[arg(long)]
        fixture_json: Option<PathBuf>,
    },
    /// Time `solve` on an EDM2-shaped run: snapshots every 8Mi images for two widths.
    Solve {
        /// Number of snapshot times (each contributes one snapshot per width).
        #[arg(long, default_value_t = 256)]
        times: usize,
        /// Number of target widths, evenly spaced over σ_rel 0.010–0.250.
        #[arg(long, default_value_t = 31)]
        targets: usize,
        /// Timed repetitions.
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Also time EDM2's algorithm in NumPy with this Python (scripts/peer_phema_solve.py).
        #[arg(long)]
        peer_python: Option<String>,
    },
}

fn main() {
    // Before any other thread exists: candle reads it when its first large element-wise op runs.
    hindsight::model::leave_cores_to_the_compute_pool();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Reconstructions keep one descriptor per snapshot open; lift the soft limit to the hard one.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    tracing::debug!(data_dir = %cli.data_dir.display(), "starting");
    if let Err(err) = run(cli) {
        // A closed pipe (`hindsight solve --table | head`) is the reader's choice, not a failure.
        let broken_pipe = err.chain().any(|e| {
            let kind = e
                .downcast_ref::<std::io::Error>()
                .map(std::io::Error::kind)
                .or_else(|| e.downcast_ref::<serde_json::Error>()?.io_error_kind());
            kind == Some(std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(0);
        }
        // One line, naming the field where the library knows it.
        let chain: Vec<String> = err.chain().map(|e| e.to_string()).collect();
        eprintln!("error: {}", chain.join(": "));
        std::process::exit(1);
    }
}

/// `N,C,O,H` for `bench conv --shape`.
fn parse_conv_shape(s: &str) -> Result<[usize; 4], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    let sizes: Vec<usize> = parts
        .iter()
        .map(|p| p.parse::<usize>().map_err(|e| format!("{p:?}: {e}")))
        .collect::<Result<_, _>>()?;
    <[usize; 4]>::try_from(sizes)
        .map_err(|v| format!("expected N,C,O,H (four sizes), got {} in {s:?}", v.len()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Solve {
            table,
            targets,
            plot,
            run,
        } => {
            let mut request = match run {
                Some(name) => {
                    if !targets.given() {
                        bail!("--run: give the targets with --sigma-rel and/or --gamma");
                    }
                    block_on(stored_snapshots(&cli.data_dir, &name))?
                }
                None => {
                    let mut text = String::new();
                    std::io::stdin()
                        .read_to_string(&mut text)
                        .context("reading the request from stdin")?;
                    SolveRequest::from_json(&text)?
                }
            };
            if targets.given() {
                if !request.targets.is_empty() {
                    bail!("targets: given both in the request and on the command line; use one");
                }
                request.targets = targets.parse()?;
            } else if targets.at_nimg.is_some() {
                bail!("--at-nimg: only applies to --sigma-rel/--gamma targets");
            }
            let response = request.solve()?;
            if let Some(path) = plot {
                let solutions: Vec<_> = response
                    .targets
                    .iter()
                    .map(|t| t.solution.clone())
                    .collect();
                let svg = hindsight::plot::profiles_svg(&request.snapshots()?, &solutions)?;
                std::fs::write(&path, svg)
                    .with_context(|| format!("--plot: writing {}", path.display()))?;
            }
            if table {
                print_table(&response)?;
            } else {
                let mut out = std::io::stdout().lock();
                serde_json::to_writer(&mut out, &response)?;
                writeln!(out)?;
            }
            Ok(())
        }
        Command::Import {
            dir,
            run,
            check_finite,
            format,
            sigma_rels,
            images_per_step,
        } => {
            let source = store_commands::Source::from_args(format, sigma_rels, images_per_step)?;
            block_on(store_commands::import(
                &cli.data_dir,
                &dir,
                &run,
                check_finite,
                source,
            ))
        }
        Command::Reconstruct {
            run,
            targets,
            dtype,
            out,
            json,
            no_verify,
            recompute,
            copy,
            report_peak_rss,
        } => {
            let targets = targets.parse()?;
            if targets.is_empty() {
                bail!("give the targets with --sigma-rel and/or --gamma");
            }
            let response = block_on(store_commands::reconstruct(
                &cli.data_dir,
                &run,
                targets,
                dtype,
                &out,
                store_commands::ReconstructFlags {
                    no_verify,
                    recompute,
                    copy,
                },
            ))?;
            if report_peak_rss {
                eprintln!(
                    "peak_rss_kib {}",
                    hindsight::bench::peak_rss_kib().unwrap_or(0)
                );
            }
            if json {
                let mut o = std::io::stdout().lock();
                serde_json::to_writer(&mut o, &response)?;
                writeln!(o)?;
            } else {
                print_table(&response)?;
            }
            Ok(())
        }
        Command::Demo {
            params,
            snapshots,
            out,
        } => {
            let input = cli.data_dir.join("demo-snapshots");
            store_commands::ensure_generated(&input, snapshots, params)?;
            block_on(store_commands::import(
                &cli.data_dir,
                &input,
                "demo",
                true,
                store_commands::Source::Safetensors,
            ))?;
            let targets = phema::parse_sigma_rel_list("0.050,0.075,...,0.250")?
                .into_iter()
                .map(|s| TargetSpec {
                    sigma_rel: Some(s),
                    gamma: None,
                    nimg: None,
                })
                .collect();
            let response = block_on(store_commands::reconstruct(
                &cli.data_dir,
                "demo",
                targets,
                store_commands::Dtype::F16,
                &out,
                store_commands::ReconstructFlags::default(),
            ))?;
            print_table(&response)?;
            eprintln!(
                "\nnext: `hindsight serve` and POST /reconstruct {{\"run\": \"demo\", \"sigma_rel\": 0.13}} \
                 (see README), or `hindsight reconstruct --run demo --sigma-rel LIST --out DIR`"
            );
            Ok(())
        }
        Command::Train(args) => {
            hindsight::model::on_compute_pool(|| train_command::train(&cli.data_dir, args))
        }
        Command::Generate(args) => {
            hindsight::model::on_compute_pool(|| generate_command::generate(&cli.data_dir, args))
        }
        Command::Serve {
            addr,
            token_file,
            insecure_no_auth,
            max_upload_bytes,
            upload_concurrency,
            reconstruct_wait_secs,
            no_verify,
        } => {
            let token_hashes = match &token_file {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let hashes =
                        hindsight::server::parse_token_hashes(&text, &path.display().to_string())?;
                    if hashes.is_empty() {
                        bail!("{} holds no token hashes", path.display());
                    }
                    hashes
                }
                None => Vec::new(),
            };
            if !addr.ip().is_loopback() && token_hashes.is_empty() && !insecure_no_auth {
                bail!(
                    "refusing to serve {addr} without authentication: give --token-file (see \
                     `hindsight token new`), bind 127.0.0.1, or pass --insecure-no-auth"
                );
            }
            if !(reconstruct_wait_secs.is_finite() && reconstruct_wait_secs >= 0.0) {
                bail!("--reconstruct-wait-secs must be a non-negative number");
            }
            let config = hindsight::server::ServerConfig {
                token_hashes,
                max_upload_bytes,
                upload_concurrency,
                reconstruct_wait: std::time::Duration::from_secs_f64(reconstruct_wait_secs),
                verify_reads: !no_verify,
                ..Default::default()
            };
            block_on(serve(cli.data_dir.clone(), addr, config))
        }
        Command::Token(TokenCommand::New { token_file }) => {
            let token = hindsight::server::new_token()?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&token_file)
                .with_context(|| format!("opening {}", token_file.display()))?;
            writeln!(f, "{}", hindsight::server::hash_token(&token))?;
            f.sync_all()?;
            println!("{token}");
            eprintln!(
                "added its hash to {}; the token itself is not stored anywhere, keep it now",
                token_file.display()
            );
            Ok(())
        }
        Command::Runs { json } => block_on(store_commands::runs(&cli.data_dir, json)),
        Command::Snapshots { run, json } => {
            block_on(store_commands::snapshots(&cli.data_dir, &run, json))
        }
        Command::Verify => block_on(store_commands::verify(&cli.data_dir)),
        Command::Gc { grace_secs } => block_on(store_commands::gc(&cli.data_dir, grace_secs)),
        Command::Bench(BenchCommand::Import {
            dir,
            snapshots,
            params,
            rounds,
        }) => block_on(store_commands::bench_import(
            &dir, snapshots, params, rounds,
        )),
        Command::Bench(BenchCommand::Reconstruct {
            dir,
            snapshots,
            params,
            rounds,
            peer_python,
        }) => block_on(store_commands::bench_reconstruct(
            &dir,
            snapshots,
            params,
            rounds,
            peer_python,
        )),
        Command::Bench(BenchCommand::Train {
            batch,
            iterations,
            peer_python,
            rounds,
        }) => hindsight::model::on_compute_pool(|| {
            train_command::bench_train(batch, iterations, peer_python.as_deref(), rounds)
        }),
        Command::Bench(BenchCommand::Conv {
            batch,
            iterations,
            rounds,
            shapes,
        }) => hindsight::model::on_compute_pool(|| {
            train_command::bench_conv(batch, iterations, rounds, &shapes)
        }),
        Command::Bench(BenchCommand::Parity {
            fixture,
            fixture_json,
        }) => train_command::bench_parity(fixture, fixture_json),
        Command::Bench(BenchCommand::Solve {
            times,
            targets,
            iterations,
            peer_python,
        }) => bench_solve(times, targets, iterations, peer_python),
    }
}

/// `hindsight serve`: opens the data directory, binds, serves until Ctrl-C or SIGTERM.
async fn serve(
    data_dir: PathBuf,
    addr: std::net::SocketAddr,
    config: hindsight::server::ServerConfig,
) -> anyhow::Result<()> {
    let data = hindsight::app::DataDir::open(&data_dir).await?;
    // Temporary files older than a day are leftovers of killed writers.
    let removed = data
        .store
        .clean_temp(std::time::Duration::from_secs(86_400))?;
    if removed > 0 {
        tracing::info!(removed, "removed abandoned temporary files");
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let auth = if config.token_hashes.is_empty() {
        "no authentication".to_owned()
    } else {
        format!("{} token(s) for writes", config.token_hashes.len())
    };
    eprintln!(
        "hindsight serving {} on http://{} ({auth}); API description at /openapi.json",
        data_dir.display(),
        listener.local_addr()?
    );
    let state = hindsight::server::AppState::new(data, config);
    hindsight::server::serve(listener, state, shutdown_signal()).await?;
    eprintln!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("shutting down: finishing requests in flight");
}

/// A solve request holding a stored run's snapshots (and no targets yet).
async fn stored_snapshots(data_dir: &std::path::Path, run: &str) -> anyhow::Result<SolveRequest> {
    let data = hindsight::app::DataDir::open(data_dir).await?;
    let Some(row) = data.db.run(run).await? else {
        bail!("run {run:?} does not exist (see `hindsight runs`)");
    };
    let snapshots = data.db.snapshots(row.id).await?;
    if snapshots.is_empty() {
        bail!("run {run:?} has no snapshots yet");
    }
    Ok(store_commands::solve_request(&snapshots))
}

/// Runs an async command to completion on a fresh multi-threaded runtime.
fn block_on<T>(fut: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(fut)
}

fn print_table(response: &SolveResponse) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>9} {:>9} {:>14} {:>5} {:>11} {:>9} {:>9} {:>9}  warnings",
        "sigma_rel", "gamma", "nimg", "used", "rel_error", "sum|w|", "gain", "cond"
    )?;
    for t in &response.targets {
        let s = &t.solution;
        let warnings: Vec<String> = s
            .warnings
            .iter()
            .map(|w| serde_json::to_string(&w.code).unwrap_or_default())
            .collect();
        writeln!(
            out,
            "{:>9.4} {:>9.3} {:>14} {:>5} {:>11.3e} {:>9.3} {:>9.3} {:>9.2e}  {}",
            s.sigma_rel,
            s.gamma,
            s.nimg,
            s.used_snapshots,
            s.relative_error,
            s.coefficient_l1,
            s.noise_gain,
            s.condition_number,
            if warnings.is_empty() {
                "-".to_owned()
            } else {
                warnings.join(",").replace('"', "")
            }
        )?;
    }
    Ok(())
}

fn bench_solve(
    times: usize,
    n_targets: usize,
    iterations: usize,
    peer_python: Option<String>,
) -> anyhow::Result<()> {
    if times == 0 || n_targets == 0 || iterations == 0 {
        bail!("--times, --targets and --iterations must be positive");
    }
    let snapshots = edm2_schedule(times, 8 << 20, &phema::DEFAULT_SIGMA_RELS);
    let targets = sigma_sweep(n_targets, 0.010, 0.250);
    let options = SolveOptions::default();
    // Warm up once, then time whole calls (Gram build, factorisation, solves, reports).
    let reference = phema::solve(&snapshots, &targets, &options)?;
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        let out = phema::solve(&snapshots, &targets, &options)?;
        samples.push(start.elapsed().as_secs_f64());
        std::hint::black_box(out);
    }
    let ours = Timing::from_samples(samples);
    println!(
        "solve: {} snapshots ({times} times x 2 widths), {n_targets} targets, {iterations} runs, {} threads",
        snapshots.len(),
        rayon::current_num_threads()
    );
    println!(
        "  hindsight: median {:.3} ms  min {:.3} ms  p90 {:.3} ms  (condition number {:.3e})",
        ours.median * 1e3,
        ours.min * 1e3,
        ours.p90 * 1e3,
        reference[0].condition_number
    );
    let Some(python) = peer_python else {
        return Ok(());
    };
    let request = SolveRequest {
        snapshots: snapshots
            .iter()
            .map(|s| SnapshotSpec {
                nimg: s.nimg,
                sigma_rel: match s.width {
                    Width::SigmaRel(v) => Some(v),
                    Width::Gamma(_) => None,
                },
                gamma: None,
            })
            .collect(),
        targets: targets
            .iter()
            .map(|t| TargetSpec {
                sigma_rel: match t.width {
                    Width::SigmaRel(v) => Some(v),
                    Width::Gamma(_) => None,
                },
                gamma: None,
                nimg: None,
            })
            .collect(),
        options: None,
        profile_points: None,
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/peer_phema_solve.py");
    let mut child = std::process::Command::new(&python)
        .arg(script)
        .arg(iterations.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {python} {script}"))?;
    serde_json::to_writer(child.stdin.take().context("peer stdin")?, &request)?;
    let output = child.wait_with_output()?;
    if !output.status.success() {
        bail!("the peer script failed ({})", output.status);
    }
    #[derive(serde::Deserialize)]
    struct PeerTiming {
        median_s: f64,
        min_s: f64,
        p90_s: f64,
    }
    #[derive(serde::Deserialize)]
    struct PeerResult {
        #[serde(flatten)]
        edm2: PeerTiming,
        vectorised: PeerTiming,
        numpy: String,
        coefficients: Vec<Vec<f64>>,
    }
    let peer: PeerResult = serde_json::from_slice(&output.stdout).context("peer output")?;
    let mut worst = 0.0f64;
    for (ours, theirs) in reference.iter().zip(&peer.coefficients) {
        let scale = ours.coefficients.iter().fold(0.0f64, |m, w| m.max(w.abs()));
        for (a, b) in ours.coefficients.iter().zip(theirs) {
            worst = worst.max((a - b).abs() / scale);
        }
    }
    let show = |name: &str, t: &PeerTiming| {
        println!(
            "  {name}: median {:.3} ms  min {:.3} ms  p90 {:.3} ms  -> hindsight is {:.1}x faster (median)",
            t.median_s * 1e3,
            t.min_s * 1e3,
            t.p90_s * 1e3,
            t.median_s / ours.median
        );
    };
    println!(
        "  peer: NumPy {} (scripts/peer_phema_solve.py), coefficients only, no report",
        peer.numpy
    );
    show("EDM2 phema.py structure", &peer.edm2);
    show("EDM2 algorithm, vectorised", &peer.vectorised);
    println!("  max coefficient difference vs EDM2: {worst:.2e} of max|w|");
    Ok(())
}
