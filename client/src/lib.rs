//! The Lode client: a file-system API ([`Client`]) over the namenode and the datanodes, used by the
//! `lode` CLI, by tests and by programs. Namespace operations are namenode calls; file data moves
//! between the client and the datanodes directly ([`put`] and [`get`]), verified piece by piece.
//!
//! Read [`fs`] first, then [`put`] and [`get`].

pub mod bulk;
pub mod certs;
pub mod config;
pub mod error;
pub mod fs;
pub mod get;
pub mod human;
pub mod put;
pub mod scan;

pub use bulk::{Outcome, Transfer};
pub use config::ClientConfig;
pub use error::Error;
pub use fs::{Client, Count, Usage};
pub use put::PutOptions;
pub use scan::{ScanOutcome, ScanStats};
