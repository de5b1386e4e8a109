//! The namenode's side of block access tokens ([`lode_protocol::token`]): keys made at random and
//! rotated, tokens signed for the blocks the namenode hands out, and the keys alive now, which
//! every heartbeat reply and registration carries to the datanodes.

use lode_protocol::token::{self, BlockToken, Grant, TokenKey};
use lode_protocol::BlockId;

/// Signs tokens and rotates the keys.
pub struct Signer {
    /// Keys still alive, newest last, each with the time it was made.
    keys: Vec<(u64, TokenKey)>,
    lifetime_ms: u64,
    rotate_ms: u64,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Signer {
    /// Tokens live `lifetime_ms`; a new key signs them every `lifetime_ms / 2`. A key outlives
    /// the last token it signed.
    pub fn new(lifetime_ms: u64) -> Signer {
        Signer {
            keys: vec![],
            lifetime_ms,
            rotate_ms: (lifetime_ms / 2).max(1),
        }
    }

    fn current(&mut self, now: u64) -> &TokenKey {
        let due = self
            .keys
            .last()
            .is_none_or(|(made, _)| now.saturating_sub(*made) >= self.rotate_ms);
        if due {
            let key = TokenKey {
                id: rand::random(),
                secret: rand::random(),
                expires_ms: now + self.rotate_ms + self.lifetime_ms,
            };
            tracing::debug!(key = key.id, "new block token key");
            self.keys.push((now, key));
        }
        self.keys.retain(|(_, k)| k.expires_ms > now);
        // Just pushed or still current.
        &self.keys[self.keys.len() - 1].1
    }

    /// A token for `block` allowing `ops` to `user`, along `pipeline` for writes and copies.
    pub fn issue(
        &mut self,
        block: BlockId,
        ops: u8,
        user: &str,
        pipeline: Vec<String>,
    ) -> BlockToken {
        let now = now_ms();
        let expires_ms = now + self.lifetime_ms;
        let key = self.current(now).clone();
        token::sign(
            &key,
            Grant {
                block,
                ops,
                user: user.to_string(),
                expires_ms,
                pipeline,
            },
        )
    }

    /// The keys datanodes need now (a new one first if it is due).
    pub fn keys(&mut self) -> Vec<TokenKey> {
        let now = now_ms();
        self.current(now);
        self.keys.iter().map(|(_, k)| k.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_with_the_keys_sent_and_keys_rotate() {
        let mut signer = Signer::new(60_000);
        let t = signer.issue(BlockId(3), token::READ, "alice", vec![]);
        let mut ring = token::KeyRing::default();
        ring.learn(&signer.keys(), now_ms());
        let g = ring
            .verify(Some(&t), BlockId(3), token::READ, now_ms())
            .unwrap();
        assert_eq!(g.user, "alice");
        assert!(ring
            .verify(Some(&t), BlockId(4), token::READ, now_ms())
            .is_err());
        // A key made long ago is replaced; the old one stays while its tokens may live.
        signer.keys[0].0 -= 30_000;
        let keys = signer.keys();
        assert_eq!(keys.len(), 2);
        let t2 = signer.issue(BlockId(3), token::READ, "alice", vec![]);
        assert_ne!(t.key_id, t2.key_id);
    }
}
