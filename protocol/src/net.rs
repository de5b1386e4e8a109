//! The one place where QUIC endpoints and rustls configurations are built, so every service uses the
//! same TLS settings: TLS 1.3 only, mutual authentication against the cluster CA, ALPN `lode/1`, ring.
//! Also: reading the caller's identity from its verified certificate, and framed request/reply helpers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{DecodeError, WireError};
use crate::frame::{self, Decoded, FrameHeader, PieceHeader, HEADER_BYTES, PIECE_HEADER_BYTES};

/// ALPN protocol id; it carries the protocol version, so peers without a common version fail the handshake.
pub const ALPN: &[u8] = b"lode/1";

/// TLS server name of the namenode certificate.
pub const NAMENODE_SERVER_NAME: &str = "namenode";

/// Paths of the PEM files a node or client authenticates with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// This node's certificate, signed by the CA.
    pub cert: PathBuf,
    /// This node's private key; must not be readable by other users.
    pub key: PathBuf,
    /// Certificates shut out although the CA signed them (lost or revoked): their SHA-256
    /// fingerprints in hex (`lode certs fingerprint FILE`, or `openssl x509 -fingerprint
    /// -sha256`; colons and case do not matter). A peer presenting one fails the handshake.
    #[serde(default)]
    pub deny: Vec<String>,
}

/// The SHA-256 fingerprint of a DER certificate, in lower-case hex.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A deny-list entry in the canonical form (`fingerprint`'s), or why it is not one.
pub fn parse_fingerprint(entry: &str) -> Result<String, String> {
    let hex: String = entry
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(format!(
            "tls.deny: {entry:?} is not a SHA-256 fingerprint (64 hex digits)"
        ))
    }
}

impl TlsFiles {
    /// The role and name of this node's own certificate.
    pub fn identity(&self) -> Result<Identity, NetError> {
        let certs = load_certs(&self.cert)?;
        identity_from_der(&certs[0]).ok_or_else(|| NetError::Credentials {
            path: self.cert.clone(),
            reason: "the certificate names no Lode role and name".into(),
        })
    }

    /// Resolves `~/` against `$HOME` and other relative paths against `base` (the directory of the
    /// config file naming them).
    pub fn relative_to(mut self, base: &Path) -> Self {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if let (Ok(rest), Some(home)) = (p.strip_prefix("~"), &home) {
                *p = home.join(rest);
            } else if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        self
    }
}

/// Transport knobs. The defaults come from measurements on a 2-core machine (see DESIGN.md): larger
/// UDP payloads cut the per-packet CPU cost, and 4 MiB socket buffers remove loss under bursts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// Largest UDP payload that path MTU discovery may reach, in bytes (1200..=6500). Default 4000;
    /// on a network with a 1500-byte MTU discovery simply stops at what the path carries.
    pub udp_payload_bytes: u16,
    /// Socket send and receive buffer size in bytes. Default 4 MiB.
    pub socket_buffer_bytes: usize,
    /// Per-stream flow-control window in bytes. Default 8 MiB.
    pub stream_window_bytes: u32,
    /// Per-connection flow-control window in bytes. Default 32 MiB.
    pub connection_window_bytes: u32,
    /// Close a connection whose peer went silent after this many milliseconds (keep-alives are sent
    /// at a third of it). This bounds how long a request to a dead peer can hang. Default 10000.
    pub idle_timeout_ms: u32,
}

/// Default for [`TransportConfig::udp_payload_bytes`].
pub const UDP_PAYLOAD_BYTES_DEFAULT: u16 = 4000;

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            udp_payload_bytes: UDP_PAYLOAD_BYTES_DEFAULT,
            socket_buffer_bytes: 4 << 20,
            stream_window_bytes: 8 << 20,
            connection_window_bytes: 32 << 20,
            idle_timeout_ms: 10_000,
        }
    }
}

impl TransportConfig {
    /// Checks ranges.
    pub fn validate(&self) -> Result<(), String> {
        if !(1200..=6500).contains(&self.udp_payload_bytes) {
            return Err(format!(
                "transport.udp_payload_bytes must be 1200..=6500, got {}",
                self.udp_payload_bytes
            ));
        }
        if self.idle_timeout_ms < 1000 {
            return Err(format!(
                "transport.idle_timeout_ms must be at least 1000, got {}",
                self.idle_timeout_ms
            ));
        }
        if self.stream_window_bytes < 65536
            || self.connection_window_bytes < self.stream_window_bytes
        {
            return Err(
                "transport windows must be at least 64 KiB and connection >= stream".into(),
            );
        }
        Ok(())
    }

    fn quinn(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(1024u32.into());
        t.max_concurrent_uni_streams(0u32.into());
        t.stream_receive_window(self.stream_window_bytes.into());
        t.receive_window(self.connection_window_bytes.into());
        t.send_window(u64::from(self.connection_window_bytes));
        t.keep_alive_interval(Some(Duration::from_millis(
            u64::from(self.idle_timeout_ms) / 3,
        )));
        if let Ok(idle) =
            quinn::IdleTimeout::try_from(Duration::from_millis(self.idle_timeout_ms.into()))
        {
            t.max_idle_timeout(Some(idle));
        }
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.udp_payload_bytes);
        t.mtu_discovery_config(Some(mtu));
        t
    }
}

/// Who is on the other end, as its verified certificate says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The namenode.
    Namenode,
    /// A datanode.
    Datanode,
    /// A cluster administrator.
    Admin,
    /// A user.
    User,
}

impl Role {
    /// The organisational-unit string stored in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Namenode => "namenode",
            Role::Datanode => "datanode",
            Role::Admin => "admin",
            Role::User => "user",
        }
    }

    /// Parses the organisational-unit string.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "namenode" => Role::Namenode,
            "datanode" => Role::Datanode,
            "admin" => Role::Admin,
            "user" => Role::User,
            _ => return None,
        })
    }
}

/// A peer's identity: its role and name from the certificate (OU and CN).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Role.
    pub role: Role,
    /// Name (`dn-1`, `admin`, `alice`).
    pub name: String,
}

/// Errors building endpoints or reading credentials.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A PEM file could not be read or parsed.
    #[error("read {path}: {reason}")]
    Credentials {
        /// File.
        path: PathBuf,
        /// Cause.
        reason: String,
    },
    /// TLS configuration was refused.
    #[error("tls setup: {0}")]
    Tls(String),
    /// Binding the UDP socket failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, NetError> {
    let err = |reason: String| NetError::Credentials {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in file".into()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, NetError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| NetError::Credentials {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(NetError::Credentials {
                path: path.to_path_buf(),
                reason: "private key is readable by other users (chmod 600 it)".into(),
            });
        }
    }
    PrivateKeyDer::from_pem_file(path).map_err(|e| NetError::Credentials {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn roots(files: &TlsFiles) -> Result<rustls::RootCertStore, NetError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(&files.ca)? {
        roots.add(c).map_err(|e| NetError::Tls(e.to_string()))?;
    }
    Ok(roots)
}

/// The deny list of `files`, canonical.
fn deny_list(files: &TlsFiles) -> Result<Arc<Vec<String>>, NetError> {
    files
        .deny
        .iter()
        .map(|e| parse_fingerprint(e))
        .collect::<Result<Vec<_>, _>>()
        .map(Arc::new)
        .map_err(NetError::Tls)
}

fn check_denied(deny: &[String], cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    if deny.contains(&fingerprint(cert)) {
        return Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Revoked,
        ));
    }
    Ok(())
}

/// The handshake-signature methods of a verifier, passed to its `inner` verifier unchanged.
macro_rules! delegate_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

/// The CA's verdict on a server's certificate, then the deny list's.
#[derive(Debug)]
struct DenyServers {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    deny: Arc<Vec<String>>,
}

impl rustls::client::danger::ServerCertVerifier for DenyServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        check_denied(&self.deny, end_entity)?;
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
    }

    delegate_signatures!();
}

/// The CA's verdict on a client's certificate, then the deny list's.
#[derive(Debug)]
struct DenyClients {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    deny: Arc<Vec<String>>,
}

impl rustls::server::danger::ClientCertVerifier for DenyClients {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        check_denied(&self.deny, end_entity)?;
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
    }

    delegate_signatures!();
}

/// Client-side QUIC configuration: trusts only the cluster CA (less the deny list) and presents
/// our certificate.
pub fn client_config(
    files: &TlsFiles,
    transport: &TransportConfig,
) -> Result<quinn::ClientConfig, NetError> {
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(files)?),
        provider(),
    )
    .build()
    .map_err(|e| NetError::Tls(e.to_string()))?;
    let verifier = Arc::new(DenyServers {
        inner: webpki,
        deny: deny_list(files)?,
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(Arc::new(transport.quinn()));
    Ok(cfg)
}

/// Server-side QUIC configuration: requires a client certificate from the cluster CA that is not
/// on the deny list.
pub fn server_config(
    files: &TlsFiles,
    transport: &TransportConfig,
) -> Result<quinn::ServerConfig, NetError> {
    let webpki = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(files)?),
        provider(),
    )
    .build()
    .map_err(|e| NetError::Tls(e.to_string()))?;
    let verifier = Arc::new(DenyClients {
        inner: webpki,
        deny: deny_list(files)?,
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| NetError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(|e| NetError::Tls(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(tls).map_err(|e| NetError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
    cfg.transport_config(Arc::new(transport.quinn()));
    Ok(cfg)
}

/// Binds a UDP socket with the configured buffer sizes and makes an endpoint on it. With `server`
/// it accepts connections; every endpoint can also connect out with `client`.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    client: quinn::ClientConfig,
    transport: &TransportConfig,
) -> Result<quinn::Endpoint, NetError> {
    let bind = |source| NetError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    let sock = socket2::SockRef::from(&socket);
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = sock.set_recv_buffer_size(transport.socket_buffer_bytes);
    let _ = sock.set_send_buffer_size(transport.socket_buffer_bytes);
    let mut ep_cfg = quinn::EndpointConfig::default();
    ep_cfg
        .max_udp_payload_size(transport.udp_payload_bytes.max(1200))
        .map_err(|e| NetError::Tls(e.to_string()))?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| NetError::Tls("no async runtime for quinn".into()))?;
    let mut ep = quinn::Endpoint::new(ep_cfg, server, socket, runtime).map_err(bind)?;
    ep.set_default_client_config(client);
    Ok(ep)
}

/// Reads the peer's role and name from its verified certificate.
pub fn peer_identity(conn: &quinn::Connection) -> Option<Identity> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    identity_from_der(certs.first()?)
}

/// Reads role (OU) and name (CN) from a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Option<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let role = subject.iter_organizational_unit().next()?.as_str().ok()?;
    Some(Identity {
        role: Role::parse(role)?,
        name,
    })
}

/// A failed request: the transport, the framing, or the peer's own error reply.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// Could not connect.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection or stream broke.
    #[error("{0}")]
    Stream(String),
    /// The peer sent bytes that are not a valid frame.
    #[error("bad frame from peer: {0}")]
    Decode(#[from] DecodeError),
    /// The peer answered with an error.
    #[error("{0}")]
    Remote(WireError),
    /// The peer reset the stream with an error code (an `ErrorCode` number).
    #[error("stream reset by peer with code {0}")]
    Reset(u64),
}

impl From<quinn::WriteError> for RpcError {
    fn from(e: quinn::WriteError) -> Self {
        RpcError::Stream(e.to_string())
    }
}
impl From<quinn::ReadExactError> for RpcError {
    fn from(e: quinn::ReadExactError) -> Self {
        RpcError::Stream(match e {
            quinn::ReadExactError::FinishedEarly(_) => "stream ended early".to_string(),
            quinn::ReadExactError::ReadError(quinn::ReadError::Reset(code)) => {
                return RpcError::Reset(code.into_inner())
            }
            quinn::ReadExactError::ReadError(e) => e.to_string(),
        })
    }
}
impl From<quinn::ConnectionError> for RpcError {
    fn from(e: quinn::ConnectionError) -> Self {
        RpcError::Stream(e.to_string())
    }
}
impl From<quinn::ClosedStream> for RpcError {
    fn from(e: quinn::ClosedStream) -> Self {
        RpcError::Stream(e.to_string())
    }
}

/// Writes one message frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    kind: u16,
    msg: &T,
) -> Result<(), RpcError> {
    let bytes = frame::encode_frame(kind, msg)?;
    send.write_all(&bytes).await?;
    Ok(())
}

/// Writes an error frame in place of a reply.
pub async fn write_error(send: &mut quinn::SendStream, err: &WireError) -> Result<(), RpcError> {
    write_frame(send, frame::kind::ERROR, err).await
}

/// Reads one frame of the `expected` kind; an error frame becomes `RpcError::Remote`.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    expected: u16,
) -> Result<T, RpcError> {
    let (header, body) = read_raw_frame(recv).await?;
    match frame::decode_body(header, expected, &body)? {
        Decoded::Message(m) => Ok(m),
        Decoded::Error(e) => Err(RpcError::Remote(e)),
    }
}

/// Reads one frame of any kind: its header and body, checked against the size limit first.
pub async fn read_raw_frame(
    recv: &mut quinn::RecvStream,
) -> Result<(FrameHeader, Vec<u8>), RpcError> {
    let mut head = [0u8; HEADER_BYTES];
    recv.read_exact(&mut head).await?;
    let header = FrameHeader::decode(&head)?;
    // The length was checked against MAX_FRAME_BYTES by decode, so this allocation is bounded.
    let mut body = vec![0u8; header.len as usize];
    recv.read_exact(&mut body).await?;
    Ok((header, body))
}

/// Reads the next frame, or `None` where the peer ended the stream cleanly between two frames.
pub async fn read_raw_frame_or_end(
    recv: &mut quinn::RecvStream,
) -> Result<Option<(FrameHeader, Vec<u8>)>, RpcError> {
    let mut head = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        match recv
            .read(&mut head[got..])
            .await
            .map_err(|e| RpcError::Stream(e.to_string()))?
        {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => {
                return Err(RpcError::Stream(
                    "stream ended inside a frame header".into(),
                ))
            }
        }
    }
    let header = FrameHeader::decode(&head)?;
    // The length was checked against MAX_FRAME_BYTES by decode, so this allocation is bounded.
    let mut body = vec![0u8; header.len as usize];
    recv.read_exact(&mut body).await?;
    Ok(Some((header, body)))
}

/// Writes a namenode reply as its frames (see [`crate::paging`]): the reply with its first page,
/// then continuation frames.
pub async fn write_paged_reply(
    send: &mut quinn::SendStream,
    reply: crate::messages::NamenodeReply,
) -> Result<(), RpcError> {
    for f in crate::paging::split_reply(reply) {
        write_frame(send, frame::kind::NAMENODE_REPLY, &f).await?;
    }
    Ok(())
}

/// A request to the namenode whose reply may run over several frames: reads the first, then
/// continuation frames (at most [`crate::paging::PAGES_MAX`]) until the namenode ends the stream.
pub async fn call_namenode(
    conn: &quinn::Connection,
    req: &crate::messages::ClientToNamenode,
) -> Result<crate::messages::NamenodeReply, RpcError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, frame::kind::CLIENT_TO_NAMENODE, req).await?;
    send.finish()?;
    let mut reply = read_frame(&mut recv, frame::kind::NAMENODE_REPLY).await?;
    for _ in 0..crate::paging::PAGES_MAX {
        let Some((header, body)) = read_raw_frame_or_end(&mut recv).await? else {
            return Ok(reply);
        };
        let more = match frame::decode_body(header, frame::kind::NAMENODE_REPLY, &body)? {
            Decoded::Message(m) => m,
            Decoded::Error(e) => return Err(RpcError::Remote(e)),
        };
        crate::paging::join_reply(&mut reply, more).map_err(RpcError::Stream)?;
    }
    Err(RpcError::Stream(format!(
        "reply runs over more than {} frames",
        crate::paging::PAGES_MAX
    )))
}

/// Writes a message between members of the namenode group as frames of `kind`, each at most
/// [`crate::messages::PEER_PART_BYTES`] of it.
pub async fn write_peer_message(
    send: &mut quinn::SendStream,
    kind: u16,
    rpc: crate::messages::PeerRpc,
    bytes: &[u8],
) -> Result<(), RpcError> {
    if bytes.len() > crate::messages::PEER_MESSAGE_MAX {
        return Err(RpcError::Stream(format!(
            "a message of {} bytes is larger than the {} a member accepts",
            bytes.len(),
            crate::messages::PEER_MESSAGE_MAX
        )));
    }
    let mut chunks = bytes.chunks(crate::messages::PEER_PART_BYTES).peekable();
    if chunks.peek().is_none() {
        let part = crate::messages::PeerPart {
            rpc,
            bytes: vec![],
            last: true,
        };
        return write_frame(send, kind, &part).await;
    }
    while let Some(c) = chunks.next() {
        let part = crate::messages::PeerPart {
            rpc,
            bytes: c.to_vec(),
            last: chunks.peek().is_none(),
        };
        write_frame(send, kind, &part).await?;
    }
    Ok(())
}

/// Reads the rest of a message between members of the namenode group, `first` being its first
/// part: parts of kind `kind` for the same call, joined up to
/// [`crate::messages::PEER_MESSAGE_MAX`] bytes (a longer message is refused before it is held).
pub async fn read_peer_message(
    recv: &mut quinn::RecvStream,
    kind: u16,
    first: crate::messages::PeerPart,
) -> Result<(crate::messages::PeerRpc, Vec<u8>), RpcError> {
    let rpc = first.rpc;
    let mut bytes = first.bytes;
    let mut last = first.last;
    while !last {
        let part: crate::messages::PeerPart = read_frame(recv, kind).await?;
        if part.rpc != rpc {
            return Err(RpcError::Stream(format!(
                "a part of {:?} inside a message of {rpc:?}",
                part.rpc
            )));
        }
        if bytes.len() + part.bytes.len() > crate::messages::PEER_MESSAGE_MAX {
            return Err(RpcError::Stream(format!(
                "message runs over {} bytes",
                crate::messages::PEER_MESSAGE_MAX
            )));
        }
        bytes.extend_from_slice(&part.bytes);
        last = part.last;
    }
    Ok((rpc, bytes))
}

/// One call to another member of the namenode group on a fresh stream: the request's parts,
/// then the reply's.
pub async fn call_peer(
    conn: &quinn::Connection,
    rpc: crate::messages::PeerRpc,
    request: &[u8],
) -> Result<Vec<u8>, RpcError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_peer_message(&mut send, frame::kind::NAMENODE_PEER, rpc, request).await?;
    send.finish()?;
    let first: crate::messages::PeerPart =
        read_frame(&mut recv, frame::kind::NAMENODE_PEER_REPLY).await?;
    let (got, reply) =
        read_peer_message(&mut recv, frame::kind::NAMENODE_PEER_REPLY, first).await?;
    if got != rpc {
        return Err(RpcError::Stream(format!(
            "the reply to {rpc:?} is one to {got:?}"
        )));
    }
    Ok(reply)
}

/// Reads a piece header and its data into `buf` (cleared first). `None` at the end marker.
pub async fn read_piece(
    recv: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
) -> Result<Option<PieceHeader>, RpcError> {
    let mut head = [0u8; PIECE_HEADER_BYTES];
    recv.read_exact(&mut head).await?;
    let header = PieceHeader::decode(&head)?;
    if header.len == 0 {
        return Ok(None);
    }
    buf.clear();
    buf.resize(header.len as usize, 0);
    recv.read_exact(buf).await?;
    Ok(Some(header))
}

/// Writes one piece (header and data).
pub async fn write_piece(
    send: &mut quinn::SendStream,
    header: &PieceHeader,
    data: &[u8],
) -> Result<(), RpcError> {
    send.write_all(&header.encode()).await?;
    if !data.is_empty() {
        send.write_all(data).await?;
    }
    Ok(())
}

/// One request and its reply on a fresh bidirectional stream.
pub async fn call<Req: Serialize, Rep: DeserializeOwned>(
    conn: &quinn::Connection,
    req_kind: u16,
    rep_kind: u16,
    req: &Req,
) -> Result<Rep, RpcError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, req_kind, req).await?;
    send.finish()?;
    read_frame(&mut recv, rep_kind).await
}

/// Connections reused across requests, one per (address, server name).
pub struct Pool {
    endpoint: quinn::Endpoint,
    conns: tokio::sync::Mutex<std::collections::HashMap<(SocketAddr, String), quinn::Connection>>,
    connect_timeout: Duration,
}

impl Pool {
    /// A pool connecting out through `endpoint`.
    pub fn new(endpoint: quinn::Endpoint, connect_timeout: Duration) -> Pool {
        Pool {
            endpoint,
            conns: Default::default(),
            connect_timeout,
        }
    }

    /// The endpoint underneath.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    /// A live connection to `addr`, whose certificate must be valid for `server_name`.
    pub async fn get(&self, addr: &str, server_name: &str) -> Result<quinn::Connection, RpcError> {
        let role = if server_name == NAMENODE_SERVER_NAME {
            Role::Namenode
        } else {
            Role::Datanode
        };
        self.get_as(addr, server_name, role).await
    }

    /// A live connection to the namenode group's member `name` at `addr`: its certificate must
    /// be valid for `name` and have the namenode role.
    pub async fn get_member(&self, addr: &str, name: &str) -> Result<quinn::Connection, RpcError> {
        self.get_as(addr, name, Role::Namenode).await
    }

    async fn get_as(
        &self,
        addr: &str,
        server_name: &str,
        role: Role,
    ) -> Result<quinn::Connection, RpcError> {
        let sock: SocketAddr = match addr.parse() {
            Ok(a) => a,
            Err(_) => tokio::net::lookup_host(addr)
                .await
                .map_err(|e| RpcError::Connect(format!("resolve {addr}: {e}")))?
                .next()
                .ok_or_else(|| RpcError::Connect(format!("resolve {addr}: no address")))?,
        };
        let key = (sock, server_name.to_string());
        {
            let mut conns = self.conns.lock().await;
            if let Some(c) = conns.get(&key) {
                if c.close_reason().is_none() {
                    return Ok(c.clone());
                }
                conns.remove(&key);
            }
        }
        // Connect without holding the lock, so one unreachable peer does not hold up the others.
        let connecting = self
            .endpoint
            .connect(sock, server_name)
            .map_err(|e| RpcError::Connect(format!("{server_name} at {addr}: {e}")))?;
        let conn = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| RpcError::Connect(format!("{server_name} at {addr}: timed out")))?
            .map_err(|e| RpcError::Connect(format!("{server_name} at {addr}: {e}")))?;
        // The certificate must be valid for the name (TLS checked that) and be the right role's:
        // a datanode certificate that names itself "namenode" is no namenode.
        // Any member of the namenode group answers to the namenode's name (its certificate
        // holds it besides its own); every other server must be the one named.
        match peer_identity(&conn) {
            Some(id)
                if id.role == role
                    && (id.name == server_name
                        || (role == Role::Namenode && server_name == NAMENODE_SERVER_NAME)) => {}
            other => {
                conn.close(0u32.into(), b"wrong role");
                let got = other.map_or("no identity".to_string(), |id| {
                    format!("{} {}", id.role.as_str(), id.name)
                });
                return Err(RpcError::Connect(format!(
                    "{server_name} at {addr}: its certificate is for {got}, not the {} {server_name}",
                    role.as_str()
                )));
            }
        }
        let mut conns = self.conns.lock().await;
        if let Some(c) = conns.get(&key) {
            if c.close_reason().is_none() {
                conn.close(0u32.into(), b"duplicate");
                return Ok(c.clone());
            }
        }
        conns.insert(key, conn.clone());
        Ok(conn)
    }

    /// Drops a connection that failed, so the next `get` reconnects. For an address given by host
    /// name (which may resolve elsewhere now), every connection to `server_name` goes.
    pub async fn forget(&self, addr: &str, server_name: &str) {
        let mut conns = self.conns.lock().await;
        match addr.parse::<SocketAddr>() {
            Ok(sock) => {
                conns.remove(&(sock, server_name.to_string()));
            }
            Err(_) => conns.retain(|(_, name), _| name != server_name),
        }
    }
}

/// Why a verified range read failed.
#[derive(Debug, thiserror::Error)]
pub enum RangeError {
    /// The request or stream failed (or the datanode refused).
    #[error("{0}")]
    Rpc(#[from] RpcError),
    /// The data or its piece values failed a check: the replica must not be trusted.
    #[error("{0}")]
    Corrupt(String),
    /// The datanode made no progress for the stall timeout.
    #[error("no progress for {0:?}, giving up on this replica")]
    Stalled(Duration),
}

impl RangeError {
    /// True when the replica itself is bad (not merely unreachable).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, RangeError::Corrupt(_))
            || matches!(self, RangeError::Rpc(RpcError::Reset(c)) if *c == crate::ErrorCode::Corrupt as u64)
    }
}

/// What to read: `[offset, offset + len)` of a block that starts at `block_offset_in_file`, whose
/// committed value (if known) is `committed`.
#[derive(Clone, Copy, Debug)]
pub struct RangeRead {
    /// Block id.
    pub block: crate::BlockId,
    /// Offset of the block in its file (pieces are hashed at their file offset).
    pub block_offset_in_file: u64,
    /// The block value recorded at commit, checked against the datanode's piece values.
    pub committed: Option<crate::Blake3Cv>,
    /// Start within the block.
    pub offset: u64,
    /// Bytes wanted.
    pub len: u64,
}

/// Reads a byte range of a block from one datanode and verifies it end to end: the datanode's piece
/// values must merge to the committed block value, and every piece must match its value.
pub async fn read_verified_range(
    conn: &quinn::Connection,
    r: RangeRead,
    token: Option<&crate::token::BlockToken>,
    stall: Duration,
) -> Result<Vec<u8>, RangeError> {
    use crate::checksum::{self, PIECE_BYTES};
    use crate::frame::kind;
    use crate::messages::{DatanodeReply, DatanodeRequest};
    let (mut send, mut recv) = conn.open_bi().await.map_err(RpcError::from)?;
    let req = DatanodeRequest::ReadBlock {
        block: r.block,
        offset: r.offset,
        len: r.len,
        token: token.cloned(),
    };
    write_frame(&mut send, kind::DATANODE_REQUEST, &req).await?;
    send.finish().map_err(RpcError::from)?;
    let start = tokio::time::timeout(
        stall,
        read_frame::<DatanodeReply>(&mut recv, kind::DATANODE_REPLY),
    )
    .await
    .map_err(|_| RangeError::Stalled(stall))??;
    let DatanodeReply::ReadStart {
        first_piece_offset,
        block_len,
        pieces,
    } = start
    else {
        return Err(RpcError::Stream(format!("unexpected reply {start:?}")).into());
    };
    let committed = r
        .committed
        .is_none_or(|cv| checksum::block_cv(&pieces) == Some(cv));
    if !committed || pieces.len() as u64 != checksum::piece_count(block_len) {
        return Err(RangeError::Corrupt(format!(
            "block {}: piece values do not match the committed block value",
            r.block
        )));
    }
    if first_piece_offset > r.offset || first_piece_offset % PIECE_BYTES != 0 {
        return Err(RangeError::Corrupt(format!(
            "block {}: datanode sent the wrong range",
            r.block
        )));
    }
    let skip = (r.offset - first_piece_offset) as usize;
    let mut data = Vec::with_capacity(r.len as usize + skip + PIECE_BYTES as usize);
    let mut piece = Vec::new();
    loop {
        let header = tokio::time::timeout(stall, read_piece(&mut recv, &mut piece))
            .await
            .map_err(|_| RangeError::Stalled(stall))??;
        let Some(header) = header else { break };
        let in_block = first_piece_offset + data.len() as u64;
        let at = r.block_offset_in_file + in_block;
        let expected = pieces.get((in_block / PIECE_BYTES) as usize);
        if Some(&checksum::piece_cv(at, &piece)) != expected || expected != Some(&header.cv) {
            return Err(RangeError::Corrupt(format!(
                "block {}: piece at {at} failed its checksum",
                r.block
            )));
        }
        data.extend_from_slice(&piece);
        if data.len() as u64 > r.len + skip as u64 + PIECE_BYTES {
            return Err(RangeError::Corrupt(format!(
                "block {}: datanode sent too much",
                r.block
            )));
        }
    }
    if (data.len() as u64) < skip as u64 + r.len {
        return Err(RangeError::Corrupt(format!(
            "block {}: short read",
            r.block
        )));
    }
    data.drain(..skip);
    data.truncate(r.len as usize);
    Ok(data)
}
