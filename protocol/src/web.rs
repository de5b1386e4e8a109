//! The HTTP side of the servers (the namenode's status page, every server's metrics), served so
//! that it cannot be used against the cluster: a connection must send its request head within
//! [`WebLimits::head`] and ends after [`WebLimits::life`] whatever it does, and at most
//! [`WebLimits::connections`] are open at once; past that, new ones are closed at once. Handlers
//! only read (nothing over HTTP changes state), and they serve from snapshots rather than passes
//! over the servers' state.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

/// Bounds on HTTP clients.
#[derive(Clone, Copy, Debug)]
pub struct WebLimits {
    /// Time to send a request head.
    pub head: Duration,
    /// A connection's whole life.
    pub life: Duration,
    /// Connections open at once.
    pub connections: usize,
}

impl Default for WebLimits {
    fn default() -> Self {
        WebLimits {
            head: Duration::from_secs(5),
            life: Duration::from_secs(30),
            connections: 64,
        }
    }
}

/// Serves `app` on `listener` with the default limits until `shutdown` changes (the servers'
/// shutdown signal).
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    serve(listener, app, WebLimits::default(), stop).await;
}

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: WebLimits,
    shutdown: impl Future<Output = ()>,
) {
    let open = Arc::new(Semaphore::new(limits.connections));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin on the error.
                tracing::warn!("http accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.life, conn).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(limits: WebLimits) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(serve(listener, app, limits, async move {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    async fn get(addr: std::net::SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        out
    }

    #[tokio::test]
    async fn slow_and_surplus_clients_are_cut_off_and_others_still_served() {
        let limits = WebLimits {
            head: Duration::from_millis(300),
            life: Duration::from_secs(5),
            connections: 2,
        };
        let (addr, _stop) = server(limits).await;
        assert!(get(addr).await.ends_with("ok"));
        // A client that never finishes its request head is closed after `head`.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(3), slow.read(&mut buf))
            .await
            .expect("the slow client is closed on time")
            .unwrap_or(0);
        assert!(!String::from_utf8_lossy(&buf[..n]).contains("ok"));
        // Two idle connections take every slot: a third is closed without an answer...
        let idle: Vec<_> = idle_connections(addr, 2).await;
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), third.read_to_string(&mut out))
            .await
            .expect("the surplus connection is closed");
        assert!(!out.contains("ok"), "{out}");
        // ...and once they are cut off (their heads never came), service resumes.
        drop(idle);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if get(addr).await.ends_with("ok") {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never served again");
            tokio::task::yield_now().await;
        }
    }

    async fn idle_connections(addr: std::net::SocketAddr, n: usize) -> Vec<tokio::net::TcpStream> {
        let mut v = vec![];
        for _ in 0..n {
            v.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        // Let the server accept both before the next connection arrives.
        for s in &v {
            s.writable().await.unwrap();
        }
        tokio::task::yield_now().await;
        v
    }
}
