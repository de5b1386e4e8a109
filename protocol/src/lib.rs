//! Lode's wire protocol: identifiers, message enums (one per direction), framing with size limits
//! checked before allocation, the stable error codes, chunk checksums (BLAKE3 chaining values of 64 KiB
//! pieces), and, in [`net`], the only place QUIC endpoints and rustls configurations are built.
//!
//! Read [`messages`] first, then [`frame`] for the bytes on the wire and [`checksum`] for integrity.
//! Version negotiation is the ALPN id (`lode/1`): a peer without a common version fails the handshake.
//! Cluster membership is the CA: every certificate is signed by the cluster's own CA, and a peer
//! with a certificate from another CA is refused during the handshake.

pub mod checksum;
pub mod error;
pub mod frame;
pub mod ids;
pub mod messages;
pub mod net;
pub mod paging;
pub mod path;
pub mod perm;
pub mod service;
pub mod token;
#[cfg(feature = "web")]
pub mod web;

pub use error::{DecodeError, ErrorCode, WireError};
pub use ids::{Blake3Cv, BlockId, InodeId, RequestId, SessionId};

/// The most a line-mode task reads past its split, into the blocks that follow, to finish its last
/// record: the client lists following blocks up to this many bytes, and a datanode stops there.
pub const TASK_FOLLOWING_BYTES_MAX: u64 = 256 << 20;

/// The largest plugin library: `plugin add` refuses a bigger one, and a datanode fetches no more.
pub const PLUGIN_BYTES_MAX: u64 = 256 << 20;

/// The largest replica count a file may have.
pub const REPLICATION_MAX: u8 = 7;

/// Checks a replica count: 1 to [`REPLICATION_MAX`].
pub fn validate_replication(replication: u8) -> Result<(), String> {
    if (1..=REPLICATION_MAX).contains(&replication) {
        Ok(())
    } else {
        Err(format!(
            "replication must be 1..={REPLICATION_MAX}, got {replication}"
        ))
    }
}
