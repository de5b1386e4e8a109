//! What every server process shares: the accept loop (connection and stream limits, identity from
//! the certificate), binding a server endpoint, logging setup and shutdown on SIGTERM / Ctrl-C.
//! Keeping these in one place stops the services drifting apart.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{watch, Semaphore};

use crate::net::{self, Identity, NetError, TlsFiles, TransportConfig};

/// Signals shutdown when its value becomes `true`.
pub type ShutdownSignal = watch::Receiver<bool>;

/// Bounds on what one server accepts at once.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are refused.
    pub connections: usize,
    /// Requests (streams) served at once on one connection; more wait.
    pub streams_per_connection: usize,
}

/// Binds a server endpoint that requires client certificates from the cluster CA and can also
/// connect out (datanodes forward to each other) with the same identity.
pub fn bind_server(
    listen: SocketAddr,
    tls: &TlsFiles,
    transport: &TransportConfig,
) -> Result<quinn::Endpoint, NetError> {
    let client = net::client_config(tls, transport)?;
    let server = net::server_config(tls, transport)?;
    net::endpoint(listen, Some(server), client, transport)
}

/// A server's request handler: one call per request stream, with the caller's verified identity.
pub trait Handler: Send + Sync + 'static {
    /// Serves one request stream.
    fn handle(
        self: Arc<Self>,
        identity: Identity,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> impl Future<Output = ()> + Send;
}

/// Serves `handler` on `endpoint` until `shutdown` fires.
pub async fn serve<H: Handler>(
    endpoint: quinn::Endpoint,
    limits: Limits,
    shutdown: ShutdownSignal,
    handler: Arc<H>,
) {
    accept_loop(endpoint, limits, shutdown, move |identity, send, recv| {
        handler.clone().handle(identity, send, recv)
    })
    .await
}

/// Accepts connections until `shutdown` fires, and runs `handle` for every request stream with the
/// caller's identity. A connection without a Lode role in its certificate is closed.
pub async fn accept_loop<F, Fut>(
    endpoint: quinn::Endpoint,
    limits: Limits,
    mut shutdown: ShutdownSignal,
    handle: F,
) where
    F: Fn(Identity, quinn::SendStream, quinn::RecvStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    let connections = Arc::new(Semaphore::new(limits.connections));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.changed() => break,
        };
        let Some(incoming) = incoming else { break };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("handshake failed: {e}");
                    return;
                }
            };
            let Some(identity) = net::peer_identity(&conn) else {
                conn.close(1u32.into(), b"certificate has no lode role");
                return;
            };
            let streams = Arc::new(Semaphore::new(limits.streams_per_connection));
            loop {
                let Ok(permit) = streams.clone().acquire_owned().await else {
                    return;
                };
                let Ok((send, recv)) = conn.accept_bi().await else {
                    return;
                };
                let fut = handle(identity.clone(), send, recv);
                tokio::spawn(async move {
                    let _permit = permit;
                    fut.await;
                });
            }
        });
    }
    endpoint.close(0u32.into(), b"shutdown");
}

/// Makes every file and directory the server creates from now on private to its user (0600 and
/// 0700): block files, sidecars, the edit log, the metadata store, checkpoints, caches.
pub fn private_files() {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o077) };
}

/// Narrows an existing directory (made by an earlier version, or by hand) to its owner.
pub fn make_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Logs to stderr at the level in `$LODE_LOG` (default `default_level`), colored only on a terminal.
pub fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LODE_LOG")
        .unwrap_or_else(|_| default_level.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// A shutdown signal that fires on SIGTERM or Ctrl-C.
pub fn shutdown_on_signals() -> ShutdownSignal {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        let _ = tx.send(true);
    });
    rx
}
