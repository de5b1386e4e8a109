//! The namenode's error type and what of it a peer may learn.

use std::path::PathBuf;

use lode_protocol::{ErrorCode, WireError};

/// Everything that can go wrong in the namenode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request was refused for a reason the caller can act on.
    #[error("{message}")]
    Refused {
        /// Code sent to the peer.
        code: ErrorCode,
        /// Message sent to the peer.
        message: String,
    },
    /// The metadata store failed.
    #[error("metadata store: {0}")]
    Store(String),
    /// The edit log could not be written or synced; the process must stop.
    #[error("edit log {path}: {source}")]
    EditLog {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Metadata on disk is inconsistent or undecodable.
    #[error("metadata corrupt: {0}")]
    Corrupt(String),
    /// Setting up the network failed.
    #[error(transparent)]
    Net(#[from] lode_protocol::net::NetError),
    /// The namespace writer stopped.
    #[error("namespace writer stopped")]
    WriterGone,
}

impl Error {
    /// A refusal with a code and message.
    pub fn refused(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Refused {
            code,
            message: message.into(),
        }
    }

    /// True when the process can no longer be trusted to accept writes.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Error::EditLog { .. } | Error::Corrupt(_) | Error::WriterGone
        )
    }
}

/// Decides what a peer may learn of an error: refusals go out as they are, internals as a code only.
pub fn to_wire(e: &Error) -> WireError {
    match e {
        Error::Refused { code, message } => WireError::new(*code, message.clone()),
        Error::WriterGone => WireError::new(ErrorCode::Unavailable, "namenode is shutting down"),
        _ => WireError::new(ErrorCode::Internal, "internal namenode error (see its log)"),
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Error::Store(e.to_string())
    }
}
