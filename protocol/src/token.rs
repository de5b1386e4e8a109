//! Block access tokens, as HDFS has them: the namenode signs, for every block it hands out, a
//! short-lived token naming the block, the operations it allows, the user and an expiry (and, for a
//! write, the pipeline it chose). Datanodes check the signature (HMAC-SHA256, `ring`) with keys the
//! namenode rotates and sends them with every heartbeat reply, and refuse any request on a block
//! without a valid token for that block.
//!
//! Keys are not stored: a restarted namenode makes new ones, and datanodes keep the keys they
//! learned until those expire, so tokens issued before a restart stay good for their lifetime.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ids::{Blake3Cv, BlockId};

/// Read the block's bytes or its checksums (also what a scan task needs).
pub const READ: u8 = 1;
/// Write the block through the pipeline the token names.
pub const WRITE: u8 = 2;
/// Copy a replica to other datanodes (re-replication, from the namenode's commands).
pub const COPY: u8 = 4;

/// A key the namenode signs tokens with.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenKey {
    /// Random id, named by every token signed with it.
    pub id: u64,
    /// The HMAC-SHA256 key.
    pub secret: [u8; 32],
    /// After this (ms since the epoch) no token signed with it is valid.
    pub expires_ms: u64,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("id", &self.id)
            .field("expires_ms", &self.expires_ms)
            .finish_non_exhaustive()
    }
}

/// What a token grants.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The one block it opens.
    pub block: BlockId,
    /// [`READ`], [`WRITE`], [`COPY`], or'ed.
    pub ops: u8,
    /// The user it was issued to (a certificate's common name).
    pub user: String,
    /// Not valid after this, ms since the epoch.
    pub expires_ms: u64,
    /// For a write or copy: the datanodes of the pipeline, in order; the block goes to no other.
    pub pipeline: Vec<String>,
}

/// A signed [`Grant`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockToken {
    /// What it grants.
    pub grant: Grant,
    /// The key it was signed with.
    pub key_id: u64,
    /// HMAC-SHA256 of the grant.
    pub mac: [u8; 32],
}

fn signed_bytes(key_id: u64, grant: &Grant) -> Vec<u8> {
    let mut bytes = b"lode 1 block token\0".to_vec();
    bytes.extend_from_slice(&key_id.to_le_bytes());
    // postcard of a plain struct cannot fail.
    bytes.extend(postcard::to_stdvec(grant).unwrap_or_default());
    bytes
}

/// Signs `grant` with `key`.
pub fn sign(key: &TokenKey, grant: Grant) -> BlockToken {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.secret);
    let tag = ring::hmac::sign(&k, &signed_bytes(key.id, &grant));
    let mut mac = [0u8; 32];
    mac.copy_from_slice(tag.as_ref());
    BlockToken {
        grant,
        key_id: key.id,
        mac,
    }
}

/// Why a token was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token came with the request.
    #[error("no block access token for block {0}")]
    Missing(BlockId),
    /// Signed with a key this datanode does not hold (or no longer does).
    #[error("block access token signed with an unknown or expired key")]
    UnknownKey,
    /// The signature does not match the grant.
    #[error("block access token with a bad signature")]
    BadSignature,
    /// Past its expiry.
    #[error("block access token expired")]
    Expired,
    /// For another block.
    #[error("block access token is for block {token}, not block {asked}")]
    OtherBlock {
        /// The token's block.
        token: BlockId,
        /// The block the request names.
        asked: BlockId,
    },
    /// Does not allow the operation.
    #[error("block access token does not allow {0}")]
    Operation(&'static str),
    /// Presented by another user than the one it was issued to.
    #[error("block access token was issued to {token}, not {peer}")]
    OtherUser {
        /// The token's user.
        token: String,
        /// The peer presenting it.
        peer: String,
    },
    /// A write sent elsewhere than the pipeline the namenode chose.
    #[error("the pipeline is not the one the block access token names")]
    Pipeline,
}

fn op_name(ops: u8) -> &'static str {
    if ops & WRITE != 0 {
        "writing"
    } else if ops & READ != 0 {
        "reading"
    } else {
        "copying"
    }
}

/// The keys a datanode holds, by id.
#[derive(Default)]
pub struct KeyRing {
    keys: BTreeMap<u64, TokenKey>,
}

/// Most keys a datanode keeps (the namenode has a few alive at any time).
pub const KEYS_MAX: usize = 64;

impl KeyRing {
    /// Takes the keys the namenode sent, and drops those expired at `now_ms`.
    pub fn learn(&mut self, keys: &[TokenKey], now_ms: u64) {
        for k in keys.iter().take(KEYS_MAX) {
            self.keys.insert(k.id, k.clone());
        }
        self.keys.retain(|_, k| k.expires_ms > now_ms);
        while self.keys.len() > KEYS_MAX {
            // Keep the keys that live longest.
            let Some(oldest) = self
                .keys
                .values()
                .min_by_key(|k| k.expires_ms)
                .map(|k| k.id)
            else {
                break;
            };
            self.keys.remove(&oldest);
        }
    }

    /// How many keys are held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Signs a receipt for this datanode's replica with the held key that lives longest (None
    /// before the namenode sent any).
    pub fn receipt(
        &self,
        datanode: &str,
        block: BlockId,
        len: u64,
        cv: Blake3Cv,
        now_ms: u64,
    ) -> Option<Receipt> {
        let key = self
            .keys
            .values()
            .filter(|k| k.expires_ms > now_ms)
            .max_by_key(|k| k.expires_ms)?;
        Some(Receipt::sign(key, datanode, block, len, cv))
    }

    /// Checks that `token` is signed by a held key, unexpired at `now_ms`, for `block`, and
    /// allows one of the operations in `ops`. The caller checks the user and pipeline with
    /// [`check_user`] and [`check_pipeline`].
    pub fn verify<'t>(
        &self,
        token: Option<&'t BlockToken>,
        block: BlockId,
        ops: u8,
        now_ms: u64,
    ) -> Result<&'t Grant, TokenError> {
        let token = token.ok_or(TokenError::Missing(block))?;
        let key = self
            .keys
            .get(&token.key_id)
            .filter(|k| k.expires_ms > now_ms)
            .ok_or(TokenError::UnknownKey)?;
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.secret);
        ring::hmac::verify(&k, &signed_bytes(token.key_id, &token.grant), &token.mac)
            .map_err(|_| TokenError::BadSignature)?;
        let g = &token.grant;
        if g.expires_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        if g.block != block {
            return Err(TokenError::OtherBlock {
                token: g.block,
                asked: block,
            });
        }
        if g.ops & ops == 0 {
            return Err(TokenError::Operation(op_name(ops)));
        }
        Ok(g)
    }
}

/// A datanode's signed word that it holds a finalized, fsynced replica of a block: it goes back
/// up the write pipeline in the acknowledgement, and the writer hands it to the namenode with the
/// commit of the block (`AddBlock`, `Complete`), so that the namenode counts the replica at once
/// instead of waiting for the datanode's next heartbeat. It is signed with a block token key, which
/// only the namenode and the datanodes hold, so a writer can carry it but not make or alter one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The datanode that holds the replica.
    pub datanode: String,
    /// The block.
    pub block: BlockId,
    /// The replica's length.
    pub len: u64,
    /// The replica's block value.
    pub cv: Blake3Cv,
    /// The key it was signed with.
    pub key_id: u64,
    /// HMAC-SHA256 of the fields above.
    pub mac: [u8; 32],
}

fn receipt_bytes(key_id: u64, datanode: &str, block: BlockId, len: u64, cv: &Blake3Cv) -> Vec<u8> {
    let mut bytes = b"lode 1 replica receipt\0".to_vec();
    bytes.extend_from_slice(&key_id.to_le_bytes());
    // postcard of plain values cannot fail.
    bytes.extend(postcard::to_stdvec(&(datanode, block, len, cv)).unwrap_or_default());
    bytes
}

impl Receipt {
    /// Datanode `datanode` signs for its replica of `block` with `key`.
    pub fn sign(key: &TokenKey, datanode: &str, block: BlockId, len: u64, cv: Blake3Cv) -> Receipt {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.secret);
        let tag = ring::hmac::sign(&k, &receipt_bytes(key.id, datanode, block, len, &cv));
        let mut mac = [0u8; 32];
        mac.copy_from_slice(tag.as_ref());
        Receipt {
            datanode: datanode.to_string(),
            block,
            len,
            cv,
            key_id: key.id,
            mac,
        }
    }

    /// Whether `key` (the one the receipt names, unexpired at `now_ms`) signed exactly this.
    pub fn verify(&self, key: &TokenKey, now_ms: u64) -> bool {
        if key.id != self.key_id || key.expires_ms <= now_ms {
            return false;
        }
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.secret);
        let bytes = receipt_bytes(self.key_id, &self.datanode, self.block, self.len, &self.cv);
        ring::hmac::verify(&k, &bytes, &self.mac).is_ok()
    }
}

/// A token is good only in the hands of the user it was issued to, or of a datanode passing it on
/// (a pipeline's next hop, a copy, a task's read of a following block).
pub fn check_user(grant: &Grant, peer: &str, peer_is_datanode: bool) -> Result<(), TokenError> {
    if peer_is_datanode || grant.user == peer {
        return Ok(());
    }
    Err(TokenError::OtherUser {
        token: grant.user.clone(),
        peer: peer.to_string(),
    })
}

/// A write reaching datanode `me` with the rest of the pipeline `downstream` must follow the
/// token's pipeline exactly from `me` on.
pub fn check_pipeline(grant: &Grant, me: &str, downstream: &[&str]) -> Result<(), TokenError> {
    let at = grant
        .pipeline
        .iter()
        .position(|n| n == me)
        .ok_or(TokenError::Pipeline)?;
    let rest: Vec<&str> = grant.pipeline[at + 1..]
        .iter()
        .map(String::as_str)
        .collect();
    if rest != downstream {
        return Err(TokenError::Pipeline);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u64, expires_ms: u64) -> TokenKey {
        TokenKey {
            id,
            secret: [id as u8; 32],
            expires_ms,
        }
    }

    fn grant(block: u64, ops: u8) -> Grant {
        Grant {
            block: BlockId(block),
            ops,
            user: "alice".into(),
            expires_ms: 1_000,
            pipeline: vec!["dn-1".into(), "dn-2".into()],
        }
    }

    #[test]
    fn a_token_opens_its_block_for_its_operations_until_it_expires() {
        let mut ring = KeyRing::default();
        ring.learn(&[key(1, 5_000)], 0);
        let t = sign(&key(1, 5_000), grant(7, READ));
        assert!(ring.verify(Some(&t), BlockId(7), READ, 10).is_ok());
        assert_eq!(
            ring.verify(Some(&t), BlockId(8), READ, 10),
            Err(TokenError::OtherBlock {
                token: BlockId(7),
                asked: BlockId(8)
            })
        );
        assert_eq!(
            ring.verify(Some(&t), BlockId(7), WRITE, 10),
            Err(TokenError::Operation("writing"))
        );
        assert_eq!(
            ring.verify(Some(&t), BlockId(7), READ, 1_000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            ring.verify(None, BlockId(7), READ, 10),
            Err(TokenError::Missing(BlockId(7)))
        );
        assert!(ring.verify(Some(&t), BlockId(7), READ | COPY, 10).is_ok());
    }

    #[test]
    fn a_changed_grant_or_an_unknown_key_is_refused() {
        let mut ring = KeyRing::default();
        ring.learn(&[key(1, 5_000)], 0);
        let mut t = sign(&key(1, 5_000), grant(7, READ));
        t.grant.ops = READ | WRITE;
        assert_eq!(
            ring.verify(Some(&t), BlockId(7), WRITE, 10),
            Err(TokenError::BadSignature)
        );
        let other = sign(&key(2, 5_000), grant(7, READ));
        assert_eq!(
            ring.verify(Some(&other), BlockId(7), READ, 10),
            Err(TokenError::UnknownKey)
        );
        let mut forged = sign(&key(1, 5_000), grant(7, READ));
        forged.mac[0] ^= 1;
        assert_eq!(
            ring.verify(Some(&forged), BlockId(7), READ, 10),
            Err(TokenError::BadSignature)
        );
        // Keys expire out of the ring.
        ring.learn(&[], 5_000);
        assert!(ring.is_empty());
    }

    #[test]
    fn a_receipt_verifies_only_unchanged_with_its_unexpired_key() {
        let mut ring = KeyRing::default();
        assert!(ring
            .receipt("dn-1", BlockId(7), 10, Blake3Cv([1; 32]), 0)
            .is_none());
        ring.learn(&[key(1, 1_000), key(2, 2_000)], 0);
        let r = ring
            .receipt("dn-1", BlockId(7), 10, Blake3Cv([1; 32]), 500)
            .unwrap();
        assert_eq!(r.key_id, 2, "signed with the key that lives longest");
        assert!(r.verify(&key(2, 2_000), 500));
        assert!(!r.verify(&key(2, 2_000), 2_000), "expired");
        assert!(!r.verify(&key(1, 2_000), 500), "another key");
        let changed = [
            Receipt {
                datanode: "dn-2".into(),
                ..r.clone()
            },
            Receipt {
                block: BlockId(8),
                ..r.clone()
            },
            Receipt {
                len: 11,
                ..r.clone()
            },
            Receipt {
                cv: Blake3Cv([2; 32]),
                ..r.clone()
            },
            Receipt {
                key_id: 1,
                ..r.clone()
            },
        ];
        for c in changed {
            assert!(!c.verify(&key(2, 2_000), 500), "{c:?}");
            assert!(!c.verify(&key(1, 2_000), 500), "{c:?}");
        }
        let mut forged = r.clone();
        forged.mac[0] ^= 1;
        assert!(!forged.verify(&key(2, 2_000), 500));
    }

    #[test]
    fn users_and_pipelines_are_checked() {
        let g = grant(7, WRITE);
        assert!(check_user(&g, "alice", false).is_ok());
        assert!(check_user(&g, "bob", false).is_err());
        assert!(check_user(&g, "dn-1", true).is_ok());
        assert!(check_pipeline(&g, "dn-1", &["dn-2"]).is_ok());
        assert!(check_pipeline(&g, "dn-2", &[]).is_ok());
        assert!(check_pipeline(&g, "dn-1", &[]).is_err());
        assert!(check_pipeline(&g, "dn-1", &["dn-3"]).is_err());
        assert!(check_pipeline(&g, "dn-3", &[]).is_err());
        assert!(check_pipeline(&g, "dn-1", &["dn-2", "dn-2"]).is_err());
    }

    #[test]
    fn the_ring_holds_a_bounded_number_of_keys() {
        let mut ring = KeyRing::default();
        let keys: Vec<TokenKey> = (0..200).map(|i| key(i, 10_000 + i)).collect();
        ring.learn(&keys, 0);
        assert!(ring.len() <= KEYS_MAX);
    }
}
