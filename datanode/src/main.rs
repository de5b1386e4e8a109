use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use lode_datanode::Config;
use lode_protocol::service;

/// The Lode datanode.
#[derive(Parser)]
#[command(name = "lode-datanode", version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Override the listen address.
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
}

fn main() {
    let args = Args::parse();
    service::init_logging("info");
    service::private_files();
    #[cfg(feature = "failpoints")]
    let _failpoints = lode_datanode::failpoints::setup();
    if let Err(e) = start(args) {
        eprintln!("lode-datanode: {e:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn start(args: Args) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    let endpoint = service::bind_server(config.listen, &config.tls, &config.transport)?;
    let shutdown = service::shutdown_on_signals();
    lode_datanode::run(config, endpoint, shutdown)
        .await
        .context("datanode stopped")
}
