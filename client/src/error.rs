//! The client's error type. Messages read as a chain: `put /a/b: block 9: connect dn-3: timed out`.

use std::path::PathBuf;

use lode_protocol::net::RpcError;
use lode_protocol::{ErrorCode, WireError};

/// Everything that can go wrong in the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file is missing or invalid.
    #[error("client config {path}: {message}")]
    Config {
        /// File.
        path: PathBuf,
        /// Cause.
        message: String,
    },
    /// The namenode or a datanode refused the request.
    #[error("{0}")]
    Remote(WireError),
    /// Talking to a server failed.
    #[error("{context}: {source}")]
    Rpc {
        /// What was being done.
        context: String,
        /// Cause.
        #[source]
        source: RpcError,
    },
    /// Data failed its checksum.
    #[error("{0}")]
    Corrupt(String),
    /// A local file operation failed.
    #[error("{path}: {source}")]
    Local {
        /// Local path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The request cannot be done as asked.
    #[error("{0}")]
    Invalid(String),
    /// Setting up TLS or the endpoint failed.
    #[error(transparent)]
    Net(#[from] lode_protocol::net::NetError),
}

impl Error {
    /// The wire code if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote(w) => Some(w.code),
            Error::Rpc {
                source: RpcError::Remote(w),
                ..
            } => Some(w.code),
            _ => None,
        }
    }

    /// Wraps an RPC failure, surfacing a server's own refusal as it is.
    pub fn rpc(context: impl Into<String>, source: RpcError) -> Error {
        match source {
            RpcError::Remote(w) => Error::Remote(w),
            source => Error::Rpc {
                context: context.into(),
                source,
            },
        }
    }

    /// Wraps a local I/O error.
    pub fn local(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Local {
            path: path.into(),
            source,
        }
    }
}
