//! Linearizable reads on a namenode group (Raft's read index, §6.4 of the Raft thesis).
//!
//! A member that believes it leads may have been deposed without knowing it (partitioned away,
//! or frozen while the others elected a new leader); what it would read from its own state could
//! miss a change the new leader has acknowledged. So before a read the leader confirms with a
//! majority that it still leads, and waits until it has applied everything committed when the
//! confirmation began ([`confirm`]). A read that arrives while a confirmation is on the way
//! waits for the next one, which began after the read arrived: concurrent reads share one round
//! trip to the majority, as concurrent changes share one append ([`Reads`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lode_protocol::ErrorCode;
use openraft::error::{CheckIsLeaderError, RaftError};

use super::journal::not_leader;
use super::Raft;
use crate::error::Error;

/// How long a leader tries to confirm its leadership before it refuses.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(3);

/// Confirms with a majority that this member leads, then waits until it has applied everything
/// committed when the confirmation began; after it, this member's state holds every change the
/// group acknowledged before the call.
pub async fn confirm(raft: &Raft) -> Result<(), Error> {
    match tokio::time::timeout(CONFIRM_TIMEOUT, raft.ensure_linearizable()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
            Err(not_leader(f.leader_id.zip(f.leader_node)))
        }
        Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
            Err(Error::refused(
                ErrorCode::Unavailable,
                format!("the namenode group has no majority now: {e}"),
            ))
        }
        Ok(Err(RaftError::Fatal(e))) => Err(Error::Store(format!("namenode group: {e}"))),
        Err(_) => Err(Error::refused(
            ErrorCode::Unavailable,
            format!(
                "this namenode could not confirm its leadership with a majority of its group \
                 within {CONFIRM_TIMEOUT:?}"
            ),
        )),
    }
}

/// A confirmation's number and outcome (a refusal as its code and message, for every reader).
type Round = (u64, Result<(), (ErrorCode, String)>);

/// Confirmations shared by the reads that wait for them.
pub struct Reads {
    raft: Raft,
    /// Confirmations begun so far (read before taking `last`, so a caller knows which rounds
    /// began after it arrived).
    begun: AtomicU64,
    /// The number and outcome of the last confirmation finished. Rounds run one at a time, under
    /// this lock.
    last: tokio::sync::Mutex<Round>,
}

impl Reads {
    /// Confirmations through `raft`.
    pub fn new(raft: Raft) -> Reads {
        Reads {
            raft,
            begun: AtomicU64::new(0),
            last: tokio::sync::Mutex::new((0, Ok(()))),
        }
    }

    /// Returns once a confirmation that began after this call has succeeded (see [`confirm`]),
    /// or with its refusal.
    pub async fn confirm(&self) -> Result<(), Error> {
        let arrived = self.begun.load(Ordering::SeqCst);
        let mut last = self.last.lock().await;
        // Rounds run one at a time under the lock, so round `arrived + 1` began after this
        // caller read `arrived`: its outcome holds for this read too.
        if last.0 <= arrived {
            let round = self.begun.fetch_add(1, Ordering::SeqCst) + 1;
            let outcome = confirm(&self.raft).await.map_err(|e| match e {
                Error::Refused { code, message } => (code, message),
                other => (ErrorCode::Internal, other.to_string()),
            });
            *last = (round, outcome);
        }
        last.1
            .clone()
            .map_err(|(code, message)| Error::refused(code, message))
    }
}
