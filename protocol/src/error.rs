//! Errors that cross the wire, and decode errors.

use serde::{Deserialize, Serialize};

/// The stable list of error codes a peer may learn. Numbers are never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u16)]
pub enum ErrorCode {
    /// The path or object does not exist.
    NotFound = 1,
    /// The path already exists.
    AlreadyExists = 2,
    /// A path component is a file where a directory is needed.
    NotADirectory = 3,
    /// The operation needs a file but the path is a directory.
    IsADirectory = 4,
    /// The directory is not empty.
    NotEmpty = 5,
    /// A request field is out of range or malformed.
    InvalidArgument = 6,
    /// The caller's certificate does not allow this.
    PermissionDenied = 7,
    /// Another client holds the write lease.
    LeaseConflict = 8,
    /// Not enough live datanodes to place a block.
    NoDatanodes = 9,
    /// Stored data failed its checksum.
    Corrupt = 10,
    /// A disk operation failed on the server.
    Io = 11,
    /// The peer broke the protocol.
    Protocol = 12,
    /// The server hit a bug or an unexpected state.
    Internal = 13,
    /// No common protocol version.
    VersionMismatch = 14,
    /// The peer belongs to another cluster.
    WrongCluster = 15,
    /// The namenode refuses namespace changes for now.
    SafeMode = 16,
    /// The server is shutting down or overloaded; try again.
    Unavailable = 17,
    /// The path is not a valid absolute path.
    InvalidPath = 18,
    /// A plugin task failed (crash, limit, error); the message names the plugin and the cause.
    PluginFailed = 19,
    /// The datanode has no room for the block on any healthy data dir.
    NoSpace = 20,
    /// A datanode refused the request's block access token (missing, expired, for another block,
    /// user or operation); the client asks the namenode for a new one.
    InvalidToken = 21,
    /// The change would take a directory past its name or space quota; the message names it.
    QuotaExceeded = 22,
    /// This namenode is not the leader of its group; the message ends with `the leader is NAME at
    /// ADDR` when it knows one, and the client retries there.
    NotLeader = 23,
}

/// An error as it crosses the wire: a code and a short message without server internals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// A short lowercase description.
    pub message: String,
}

impl WireError {
    /// Builds a wire error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }
}

/// Bytes that do not form a valid frame or message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The header announces a body larger than the limit for its kind.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// The frame kind is unknown or not the one expected here.
    #[error("unexpected frame kind {got}, expected {expected}")]
    UnexpectedKind {
        /// Kind received.
        got: u16,
        /// Kind expected.
        expected: u16,
    },
    /// The body encoding version is not one this build reads.
    #[error("unsupported encoding version {0}")]
    Version(u8),
    /// The body did not decode.
    #[error("malformed message body: {0}")]
    Body(String),
}
