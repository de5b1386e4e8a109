use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use lode_namenode::Config;
use lode_protocol::service;

/// The Lode namenode.
#[derive(Parser)]
#[command(name = "lode-namenode", version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Override the listen address.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Restore a metadata backup (from `lode admin backup`) into the config's empty meta_dir, then exit.
    #[arg(long, value_name = "FILE")]
    restore_from: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    service::init_logging("info");
    service::private_files();
    #[cfg(feature = "failpoints")]
    let _failpoints = lode_namenode::failpoints::setup();
    if let Err(e) = start(args) {
        eprintln!("lode-namenode: {e:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn start(args: Args) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    if let Some(file) = args.restore_from {
        let dir = config.meta_dir.clone();
        let applied =
            tokio::task::spawn_blocking(move || lode_namenode::backup::restore(&file, &dir))
                .await??;
        println!(
            "restored metadata up to edit {applied} into {}",
            config.meta_dir.display()
        );
        return Ok(());
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    let endpoint = service::bind_server(config.listen, &config.tls, &config.transport)?;
    let shutdown = service::shutdown_on_signals();
    lode_namenode::run(config, endpoint, shutdown)
        .await
        .context("namenode stopped")
}
