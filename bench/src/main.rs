//! `lode-bench`: the pieces of the benchmark that need code (bench/run.sh drives them and the CLI).
//!
//! - `hash FILE`: BLAKE3 of a file on one core, in MB/s.
//! - `transport-serve` / `transport-send`: one QUIC + mutual TLS stream between two processes with the
//!   project's own transport settings (protocol::net), in MB/s: the ceiling for put and get.
//! - `mkdirs`: durable mkdirs (or empty-file creates) per second from several concurrent clients,
//!   each with some requests outstanding (group commit at work).
//! - `synth` / `datanodes`: the namenode at scale (see `scale.rs`).

mod scale;

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use bytes::Bytes;
use clap::{Parser, Subcommand};
use lode_protocol::net::{self, TlsFiles, TransportConfig};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Hash a file with BLAKE3 on one core.
    Hash { file: PathBuf },
    /// Accept one connection and count the bytes of one stream.
    TransportServe {
        #[arg(long)]
        certs: PathBuf,
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Send N bytes on one stream to a transport-serve process.
    TransportSend {
        #[arg(long)]
        certs: PathBuf,
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        bytes: u64,
    },
    /// Write N bytes of log-like text lines (about 1 in 50 holds ERROR).
    Text {
        #[arg(long)]
        bytes: u64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Concurrent durable mkdirs (or creates of empty files), each client on its connection with
    /// `in_flight` requests outstanding.
    Mkdirs {
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 8)]
        clients: usize,
        #[arg(long, default_value_t = 250)]
        ops_per_client: usize,
        #[arg(long, default_value_t = 1)]
        in_flight: usize,
        /// Create empty files (a create and a complete each) instead of making directories.
        #[arg(long)]
        files: bool,
    },
    /// Write a synthetic namespace into a new metadata directory.
    Synth {
        #[arg(long)]
        meta_dir: PathBuf,
        #[command(flatten)]
        layout: scale::Layout,
    },
    /// Simulated datanodes against a namenode started on a synthetic namespace.
    Datanodes(scale::SimArgs),
}

fn tls(certs: &std::path::Path, name: &str) -> TlsFiles {
    TlsFiles {
        ca: certs.join("ca.pem"),
        cert: certs.join(format!("{name}.pem")),
        key: certs.join(format!("{name}-key.pem")),
        ..Default::default()
    }
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Synth { meta_dir, layout } => scale::synth(&meta_dir, &layout)?,
        Cmd::Datanodes(args) => scale::datanodes(args).await?,
        Cmd::Hash { file } => {
            let mut f = std::fs::File::open(&file).with_context(|| file.display().to_string())?;
            let start = Instant::now();
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            let secs = start.elapsed().as_secs_f64();
            println!("{:.1} {}", mbps(total, secs), hasher.finalize().to_hex());
        }
        Cmd::TransportServe { certs, listen } => {
            let t = TransportConfig::default();
            let files = tls(&certs, "namenode");
            let ep = net::endpoint(
                listen,
                Some(net::server_config(&files, &t)?),
                net::client_config(&files, &t)?,
                &t,
            )?;
            let conn = ep.accept().await.context("no connection")?.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut total = 0u64;
            while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
                total += chunk.bytes.len() as u64;
            }
            send.write_all(&total.to_le_bytes()).await?;
            send.finish()?;
            let _ = send.stopped().await;
        }
        Cmd::TransportSend { certs, addr, bytes } => {
            let t = TransportConfig::default();
            let files = tls(&certs, "user");
            let ep = net::endpoint(
                "127.0.0.1:0".parse()?,
                None,
                net::client_config(&files, &t)?,
                &t,
            )?;
            let conn = ep.connect(addr, net::NAMENODE_SERVER_NAME)?.await?;
            let chunk = Bytes::from(vec![0x5au8; 1 << 20]);
            let start = Instant::now();
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(chunk.len() as u64) as usize;
                send.write_chunk(chunk.slice(..n)).await?;
                sent += n as u64;
            }
            send.finish()?;
            let mut ack = [0u8; 8];
            recv.read_exact(&mut ack).await?;
            let secs = start.elapsed().as_secs_f64();
            anyhow::ensure!(
                u64::from_le_bytes(ack) == bytes,
                "server counted a different number of bytes"
            );
            println!("{:.1}", mbps(bytes, secs));
        }
        Cmd::Text { bytes, out } => {
            use std::io::Write;
            let words = [
                "alpha", "beta", "gamma", "delta", "request", "served", "user", "cache", "miss",
                "disk",
            ];
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&out)?);
            let mut state = 0x2545f4914f6cdd1du64;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mut written = 0u64;
            let mut line = String::with_capacity(256);
            let mut n = 0u64;
            while written < bytes {
                line.clear();
                n += 1;
                let level = if next() % 50 == 0 { "ERROR" } else { "INFO" };
                line.push_str(&format!(
                    "2026-11-25T04:{:02}:{:02} {level} id={n}",
                    n % 60,
                    (n / 60) % 60
                ));
                for _ in 0..(4 + next() % 12) {
                    line.push(' ');
                    line.push_str(words[(next() % words.len() as u64) as usize]);
                }
                line.push('\n');
                let take = ((bytes - written) as usize).min(line.len());
                w.write_all(&line.as_bytes()[..take])?;
                written += take as u64;
            }
            w.flush()?;
        }
        Cmd::Mkdirs {
            config,
            clients,
            ops_per_client,
            in_flight,
            files,
        } => {
            let cfg = lode_client::ClientConfig::load(&config)?;
            let mut handles = vec![];
            let mut conns = vec![];
            for _ in 0..clients {
                conns.push(std::sync::Arc::new(
                    lode_client::Client::connect(cfg.clone()).await?,
                ));
            }
            let run = format!("/bench-mkdirs-{}", std::process::id());
            conns[0].mkdir(&run, true).await?;
            let start = Instant::now();
            let in_flight = in_flight.max(1);
            for (i, c) in conns.into_iter().enumerate() {
                let run = run.clone();
                handles.push(tokio::spawn(async move {
                    // `in_flight` workers share the client's connection and its ops.
                    let mut workers = tokio::task::JoinSet::new();
                    for w in 0..in_flight {
                        let (c, run) = (c.clone(), run.clone());
                        workers.spawn(async move {
                            for k in (w..ops_per_client).step_by(in_flight) {
                                let path = format!("{run}/c{i}-{k}");
                                if files {
                                    let opts = lode_client::PutOptions::default();
                                    c.put(tokio::io::empty(), &path, &opts, &|_| {}).await?;
                                } else {
                                    c.mkdir(&path, false).await?;
                                }
                            }
                            Ok::<_, lode_client::Error>(())
                        });
                    }
                    while let Some(r) = workers.join_next().await {
                        r.map_err(|e| lode_client::Error::Invalid(e.to_string()))??;
                    }
                    Ok::<_, lode_client::Error>(c)
                }));
            }
            let mut last = None;
            for h in handles {
                last = Some(h.await??);
            }
            let secs = start.elapsed().as_secs_f64();
            println!("{:.0}", (clients * ops_per_client) as f64 / secs);
            if let Some(c) = last {
                c.delete(&run, true).await?;
            }
        }
    }
    Ok(())
}
