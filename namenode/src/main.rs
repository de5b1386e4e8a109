use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use lode_namenode::Config;
use lode_protocol::net;

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
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LODE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = start(args) {
        eprintln!("lode-namenode: {e:#}");
        std::process::exit(1);
    }
}

#[tokio::main]
async fn start(args: Args) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    let client = net::client_config(&config.tls, &config.transport)?;
    let server = net::server_config(&config.tls, &config.transport)?;
    let endpoint = net::endpoint(config.listen, Some(server), client, &config.transport)?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = tx.send(true);
    });
    lode_namenode::run(config, endpoint, rx)
        .await
        .context("namenode stopped")
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
