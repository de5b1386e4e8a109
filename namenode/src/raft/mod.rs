//! The namespace log replicated across a group of namenodes with openraft.
//!
//! The edit log becomes the Raft log of the group: each entry carries one group commit of the
//! namespace writer ([`Edits`]: the edits of many requests, numbered from `first_seq`). An entry
//! is acknowledged once a majority of the members hold it durably ([`log::LogStore`]: fdatasync'ed
//! records, the vote written durably), and every member applies it with the same deterministic
//! apply the single namenode uses ([`sm::StateMachine`] over the sled store). A snapshot is the
//! consistent dump of the metadata store ([`crate::backup::dump`]), and installing one is a
//! restore. Members talk over QUIC with mutual TLS ([`net`]): only a certificate with the
//! namenode role whose name is a member of the group can take part, and a request must come from
//! the member it claims to come from.

// openraft's error types are large by design; they are returned as openraft defines them.
#![allow(clippy::result_large_err)]

pub mod journal;
pub mod log;
pub mod members;
pub mod net;
pub mod reads;
pub mod sm;
pub mod status;

use std::fmt;
use std::io::Cursor;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::namespace::MetaOp;

/// A member's id in the group (stable for the member's life; never reused for another machine).
pub type NodeId = u64;

/// A member of the namenode group: the name its certificate carries and where it listens.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The certificate's common name (`nn-1`).
    pub name: String,
    /// `host:port` of its QUIC endpoint.
    pub addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// One group commit: edits numbered `first_seq`, `first_seq + 1`, ... in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Edits {
    /// The sequence number of the first edit.
    pub first_seq: u64,
    /// The edits.
    pub ops: Vec<MetaOp>,
}

impl fmt::Display for Edits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ops.len() {
            0 => write!(f, "no edits"),
            n => write!(
                f,
                "edits {}..={}",
                self.first_seq,
                self.first_seq + n as u64 - 1
            ),
        }
    }
}

openraft::declare_raft_types!(
    /// The namenode group's Raft types.
    pub Lode:
        D = Edits,
        R = (),
        NodeId = NodeId,
        Node = Member,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The group's Raft handle.
pub type Raft = openraft::Raft<Lode>;
/// A log entry.
pub type Entry = openraft::Entry<Lode>;
/// A log position.
pub type LogId = openraft::LogId<NodeId>;
/// A vote.
pub type Vote = openraft::Vote<NodeId>;
/// A storage failure, as openraft reports it.
pub type StorageError = openraft::StorageError<NodeId>;
/// The membership as stored in the log or the state machine.
pub type StoredMembership = openraft::StoredMembership<NodeId, Member>;

/// Timings of the group (the dev cluster's are short, as with datanodes).
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How often the leader sends heartbeats.
    pub heartbeat: Duration,
    /// A follower that hears nothing for a random time in `[election_min, election_max)` stands
    /// for election.
    pub election_min: Duration,
    /// See `election_min`.
    pub election_max: Duration,
    /// A snapshot is built once this many entries were applied since the last one.
    pub snapshot_every: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            heartbeat: Duration::from_millis(250),
            election_min: Duration::from_millis(1000),
            election_max: Duration::from_millis(2000),
            snapshot_every: 20_000,
        }
    }
}

/// Largest snapshot chunk sent in one message (below the frame limit, with room for the header).
pub const SNAPSHOT_CHUNK_BYTES: u64 = 3 << 20;

/// openraft's settings for the group.
pub fn config(timing: &Timing) -> Result<openraft::Config, String> {
    let ms = |d: Duration| d.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: "lode-namenodes".into(),
        heartbeat_interval: ms(timing.heartbeat),
        election_timeout_min: ms(timing.election_min),
        election_timeout_max: ms(timing.election_max),
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(timing.snapshot_every),
        // Entries kept in the log after a snapshot, so a follower a little behind catches up
        // from the log rather than by a whole snapshot.
        max_in_snapshot_log_to_keep: 1000,
        snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
        max_payload_entries: 64,
        // A leader that cannot reach a quorum for this long steps down (its lease is over).
        enable_heartbeat: true,
        enable_elect: true,
        ..Default::default()
    };
    c.validate().map_err(|e| e.to_string())
}

/// An I/O failure of the log or the state machine, as openraft wants it.
pub(crate) fn io_error(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    StorageError::from(openraft::StorageIOError::new(
        subject,
        verb,
        openraft::AnyError::error(e.to_string()),
    ))
}
