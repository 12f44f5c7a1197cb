//! The `hindsight` command line: tracing set-up, parsing, and turning errors into exit codes
//! and one-line messages. The commands themselves are in `cli/`.

use clap::Parser;

mod cli;

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
    let cli = cli::Cli::parse();
    // Reconstructions keep one descriptor per snapshot open; lift the soft limit to the hard one.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    if let Err(err) = cli::run(cli) {
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
        // One line, naming the field where the library knows it, each message once.
        let chain: &(dyn std::error::Error + 'static) = err.as_ref();
        eprintln!("error: {}", hindsight::error::chain_text(chain));
        if let Some(hint) = err.chain().find_map(|e| cli::hint(e.downcast_ref()?)) {
            eprintln!("hint: {hint}");
        }
        std::process::exit(1);
    }
}
