//! `natter-worker`: serve models, fetch them, or benchmark them.

use anyhow::Context;
use clap::{Parser, Subcommand};
use natter_worker::config::{CommonArgs, RunArgs};

#[derive(Parser)]
#[command(
    name = "natter-worker",
    version,
    about = "natter inference worker: pulls jobs from NATS JetStream and runs them"
)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve jobs (the default).
    Run,
    /// Fetch or list catalog models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Measure single-stream chat speed: time to first token, prompt and decode tokens/s.
    Bench(natter_worker::bench::BenchArgs),
    /// Measure NER latency and texts/s for inputs of several lengths.
    BenchNer(natter_worker::bench::BenchNerArgs),
    /// Transcribe audio files; prints each one's real-time factor and transcript.
    BenchAsr(natter_worker::bench::BenchAsrArgs),
    /// Read images; prints each one's latency, stage timings and character error rate.
    BenchOcr(natter_worker::bench::BenchOcrArgs),
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download models (default: the default model of each kind a worker serves).
    Fetch {
        /// Catalog ids; `all` fetches every model.
        ids: Vec<String>,
    },
    /// List catalog models and whether each is fetched.
    List,
    /// Print where a fetched model lives.
    Path { id: String },
}

fn set_threads(threads: usize) {
    if threads > 0 {
        // candle sizes its thread pool from this on first use.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

fn main() -> anyhow::Result<()> {
    natter_shared::telemetry::init();
    let cli = Cli::parse();
    let loaded = cli.common.load()?;
    match cli.command {
        Some(Command::Models(ModelsCommand::List)) => {
            for m in &loaded.catalog.models {
                let have = natter_worker::fetch::resolve(m, &loaded.models_dir).is_ok();
                println!(
                    "{:<32} {:<5} {:<8} {:<9} {}",
                    m.id,
                    m.kind,
                    m.arch,
                    if have { "fetched" } else { "missing" },
                    m.description
                );
            }
            Ok(())
        }
        Some(Command::Models(ModelsCommand::Path { id })) => {
            let entry = loaded.catalog.get(&id).with_context(|| format!("model `{id}` is not in the catalog"))?;
            println!("{}", natter_worker::fetch::resolve(entry, &loaded.models_dir)?.display());
            Ok(())
        }
        Some(Command::Models(ModelsCommand::Fetch { ids })) => {
            let entries: Vec<_> = if ids.is_empty() {
                natter_worker::SERVED_KINDS.iter().filter_map(|k| loaded.catalog.default_for(*k).cloned()).collect()
            } else if ids.iter().any(|i| i == "all") {
                loaded.catalog.models.clone()
            } else {
                ids.iter()
                    .map(|id| {
                        loaded.catalog.get(id).cloned().with_context(|| format!("model `{id}` is not in the catalog"))
                    })
                    .collect::<anyhow::Result<_>>()?
            };
            for entry in entries {
                natter_worker::fetch::fetch(&entry, &loaded.models_dir)?;
            }
            Ok(())
        }
        Some(Command::BenchNer(args)) => {
            set_threads(args.threads);
            natter_worker::bench::run_ner(&args, &loaded)?;
            Ok(())
        }
        Some(Command::BenchOcr(args)) => {
            set_threads(args.threads);
            natter_worker::bench::run_ocr(&args, &loaded)?;
            Ok(())
        }
        Some(Command::BenchAsr(args)) => {
            set_threads(args.threads);
            natter_worker::bench::run_asr(&args, &loaded)?;
            Ok(())
        }
        Some(Command::Bench(args)) => {
            set_threads(args.threads);
            natter_worker::bench::run(&args, &loaded)?;
            Ok(())
        }
        Some(Command::Run) | None => {
            let args = cli.run;
            set_threads(args.threads(&loaded.file));
            let config = args.resolve(loaded)?;
            tokio::runtime::Runtime::new()?.block_on(natter_worker::run(config, natter_shared::shutdown::signal()))?;
            Ok(())
        }
    }
}
