//! What every server process shares: the accept loop (connection and stream limits, identity from
//! the certificate), binding a server endpoint, logging setup and shutdown on SIGTERM / Ctrl-C.
//! Keeping these in one place stops the services drifting apart.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::net::{self, Identity, NetError, TlsFiles, TransportConfig};

/// Signals shutdown when its value becomes `true`.
pub type ShutdownSignal = watch::Receiver<bool>;

/// How long a peer has, once it opens a request stream, to send the whole request frame.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Bounds on what one server accepts at once, in all and from one peer (one certificate identity:
/// role and name), so that one noisy or hostile peer cannot take what the others need.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are refused.
    pub connections: usize,
    /// Connections of one peer at once; more are closed once the handshake names the peer.
    pub connections_per_peer: usize,
    /// Requests (streams) served at once on one connection; more wait.
    pub streams_per_connection: usize,
    /// Requests served at once for one peer, over all its connections; more wait.
    pub streams_per_peer: usize,
}

/// What one peer holds of a server: its connections and a stream budget shared by all of them.
struct Peer {
    connections: usize,
    streams: Arc<Semaphore>,
}

/// The peers connected now, by identity.
#[derive(Default)]
struct Peers {
    by_identity: Mutex<HashMap<(crate::net::Role, String), Peer>>,
}

impl Peers {
    /// Counts a new connection of `identity`; `None` when it has as many as it may.
    fn join(&self, identity: &Identity, limits: &Limits) -> Option<PeerConnection<'_>> {
        let key = (identity.role, identity.name.clone());
        let mut map = self.by_identity.lock().unwrap_or_else(|p| p.into_inner());
        let peer = map.entry(key.clone()).or_insert_with(|| Peer {
            connections: 0,
            streams: Arc::new(Semaphore::new(limits.streams_per_peer)),
        });
        if peer.connections >= limits.connections_per_peer {
            return None;
        }
        peer.connections += 1;
        Some(PeerConnection {
            peers: self,
            key,
            streams: peer.streams.clone(),
        })
    }
}

/// One connection of a peer; leaving forgets the peer with its last connection.
struct PeerConnection<'a> {
    peers: &'a Peers,
    key: (crate::net::Role, String),
    streams: Arc<Semaphore>,
}

impl Drop for PeerConnection<'_> {
    fn drop(&mut self) {
        let mut map = self
            .peers
            .by_identity
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(peer) = map.get_mut(&self.key) {
            peer.connections -= 1;
            if peer.connections == 0 {
                map.remove(&self.key);
            }
        }
    }
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

/// A server's request handler: one call per request stream, with the caller's verified identity
/// and address.
pub trait Handler: Send + Sync + 'static {
    /// Serves one request stream.
    fn handle(
        self: Arc<Self>,
        identity: Identity,
        addr: SocketAddr,
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
    accept_loop(
        endpoint,
        limits,
        shutdown,
        move |identity, addr, send, recv| handler.clone().handle(identity, addr, send, recv),
    )
    .await
}

/// Accepts connections until `shutdown` fires, and runs `handle` for every request stream with the
/// caller's identity and address. A connection without a Lode role in its certificate is closed.
pub async fn accept_loop<F, Fut>(
    endpoint: quinn::Endpoint,
    limits: Limits,
    mut shutdown: ShutdownSignal,
    handle: F,
) where
    F: Fn(Identity, SocketAddr, quinn::SendStream, quinn::RecvStream) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let handle = Arc::new(handle);
    let connections = Arc::new(Semaphore::new(limits.connections));
    let peers = Arc::new(Peers::default());
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
        let peers = peers.clone();
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
            let Some(peer) = peers.join(&identity, &limits) else {
                tracing::warn!(peer = %identity.name, "connection refused: the peer has {} open", limits.connections_per_peer);
                conn.close(2u32.into(), b"too many connections from this certificate");
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
                // Taken only once a request has come, so idle connections hold none of the
                // peer's budget; while it is spent, this connection's next requests wait.
                let Ok(peer_permit) = peer.streams.clone().acquire_owned().await else {
                    return;
                };
                let fut = handle(identity.clone(), conn.remote_address(), send, recv);
                tokio::spawn(async move {
                    let _permits = (permit, peer_permit);
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
