//! The datanode's error type and what of it a peer may learn.

use std::path::PathBuf;

use lode_protocol::{BlockId, ErrorCode, WireError};

/// Everything that can go wrong in the datanode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such block here.
    #[error("block {id} not found")]
    BlockNotFound {
        /// Block.
        id: BlockId,
    },
    /// Data failed its chunk checksum.
    #[error("block {id} failed its hash check at offset {offset} during {stage}")]
    Corrupt {
        /// Block.
        id: BlockId,
        /// Offset in the block.
        offset: u64,
        /// `write` or `read`.
        stage: &'static str,
    },
    /// A disk operation failed.
    #[error("disk i/o on {path}: {source}")]
    Disk {
        /// File or directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No healthy data dir has room for the block.
    #[error("out of space: {0}")]
    NoSpace(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Network or framing trouble with a peer.
    #[error(transparent)]
    Rpc(#[from] lode_protocol::net::RpcError),
    /// Setting up the network failed.
    #[error(transparent)]
    Net(#[from] lode_protocol::net::NetError),
    /// A plugin task failed; the message names the plugin and the cause.
    #[error("{0}")]
    Plugin(String),
    /// The plugin is not approved by an admin.
    #[error("{0}")]
    NotApproved(String),
    /// The request's block access token does not open what it asks for.
    #[error("{0}")]
    Token(lode_protocol::token::TokenError),
}

impl Error {
    /// Wraps an I/O error with its path.
    pub fn disk(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Disk {
            path: path.into(),
            source,
        }
    }
}

/// Decides what a peer may learn: codes and short messages, no paths.
pub fn to_wire(e: &Error) -> WireError {
    match e {
        Error::BlockNotFound { .. } => WireError::new(ErrorCode::NotFound, e.to_string()),
        Error::Token(_) => WireError::new(ErrorCode::InvalidToken, e.to_string()),
        Error::Corrupt { .. } => WireError::new(ErrorCode::Corrupt, e.to_string()),
        Error::Disk { .. } => WireError::new(ErrorCode::Io, "datanode disk error"),
        Error::NoSpace(_) => WireError::new(ErrorCode::NoSpace, "datanode is out of space"),
        Error::Invalid(m) => WireError::new(ErrorCode::InvalidArgument, m.clone()),
        Error::Rpc(r) => WireError::new(ErrorCode::Unavailable, r.to_string()),
        Error::Net(_) => WireError::new(ErrorCode::Internal, "datanode network setup"),
        Error::Plugin(m) => WireError::new(ErrorCode::PluginFailed, m.clone()),
        Error::NotApproved(m) => WireError::new(ErrorCode::PermissionDenied, m.clone()),
    }
}
