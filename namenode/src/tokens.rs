//! The namenode's side of block access tokens ([`lode_protocol::token`]): keys made at random and
//! rotated, tokens signed for the blocks the namenode hands out, and the keys alive now, which
//! every heartbeat reply and registration carries to the datanodes.

use lode_protocol::token::{self, BlockToken, Grant, Receipt, TokenKey};
use lode_protocol::BlockId;

/// Signs tokens and rotates the keys. Each key signs for one rotation period, and the next key is
/// made (and sent to datanodes) a period before it starts signing, so that a rotation never hands
/// out a token a datanode cannot check yet.
pub struct Signer {
    /// Keys still alive, each with the time it starts signing, in that order.
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
    /// Tokens live `lifetime_ms`; a key signs for `lifetime_ms / 2` and outlives the last token it
    /// signed.
    pub fn new(lifetime_ms: u64) -> Signer {
        Signer {
            keys: vec![],
            lifetime_ms,
            rotate_ms: (lifetime_ms / 2).max(1),
        }
    }

    fn make(&mut self, from: u64) {
        let key = TokenKey {
            id: rand::random(),
            secret: rand::random(),
            expires_ms: from + self.rotate_ms + self.lifetime_ms,
        };
        tracing::debug!(key = key.id, from, "new block token key");
        self.keys.push((from, key));
    }

    /// The key that signs at `now`, with the next one made ahead.
    fn current(&mut self, now: u64) -> TokenKey {
        self.keys.retain(|(_, k)| k.expires_ms > now);
        let rotate = self.rotate_ms;
        let signing = |keys: &[(u64, TokenKey)]| {
            keys.iter()
                .rposition(|(from, _)| *from <= now && now < from + rotate)
        };
        let at = match signing(&self.keys) {
            Some(i) => i,
            None => {
                self.make(now);
                self.keys.len() - 1
            }
        };
        let (from, key) = self.keys[at].clone();
        if !self.keys.iter().any(|(f, _)| *f == from + rotate) {
            self.make(from + rotate);
        }
        key
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
        let key = self.current(now);
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

    /// Whether a datanode's receipt is signed by a key alive now.
    pub fn check_receipt(&self, receipt: &Receipt) -> bool {
        let now = now_ms();
        self.keys
            .iter()
            .any(|(_, k)| k.id == receipt.key_id && receipt.verify(k, now))
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
    fn issued_tokens_verify_with_the_keys_sent_and_the_next_key_is_sent_ahead() {
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
        assert_eq!(signer.keys().len(), 2, "the one signing and the next");
        // A period later the next key signs, and the datanodes already hold it.
        for (from, _) in &mut signer.keys {
            *from -= 30_000;
        }
        let t2 = signer.issue(BlockId(3), token::READ, "alice", vec![]);
        assert_ne!(t.key_id, t2.key_id);
        assert!(ring
            .verify(Some(&t2), BlockId(3), token::READ, now_ms())
            .is_ok());
        assert!(ring
            .verify(Some(&t), BlockId(3), token::READ, now_ms())
            .is_ok());
        assert_eq!(
            signer.keys().len(),
            3,
            "the old one lives while its tokens may"
        );
    }
}
