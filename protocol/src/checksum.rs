//! Chunk checksums: BLAKE3 chaining values of 64 KiB pieces, and merging them into block values and
//! into the file's BLAKE3 hash (equal to `b3sum` of the same bytes).
//!
//! BLAKE3 hashes a binary tree of 1 KiB chunks whose left subtree always holds the largest power of two
//! of chunks that leaves at least one byte for the right. Pieces are 64 KiB and blocks a power of two of
//! at least 64 KiB, so every piece and every block of a file is a whole subtree of that tree: the value of
//! a piece (or block) at its offset, merged with its neighbours in the same shape, gives the root.

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};

use crate::ids::Blake3Cv;

/// Size of the piece that carries one chunk checksum.
pub const PIECE_BYTES: u64 = 64 * 1024;

/// The smallest allowed block size; every block size is a power of two at least this large.
pub const BLOCK_BYTES_MIN: u64 = PIECE_BYTES;

/// The largest allowed block size (keeps a block's checksum list within one frame).
pub const BLOCK_BYTES_MAX: u64 = 1 << 30;

/// Checks a block size: a power of two from 64 KiB to 1 GiB.
pub fn validate_block_size(bytes: u64) -> Result<(), String> {
    if !bytes.is_power_of_two() || !(BLOCK_BYTES_MIN..=BLOCK_BYTES_MAX).contains(&bytes) {
        return Err(format!(
            "block size must be a power of two from 64 KiB to 1 GiB, got {bytes} bytes"
        ));
    }
    Ok(())
}

/// The chaining value of `data`, a piece (or any whole subtree) starting at `offset` in the file.
pub fn piece_cv(offset: u64, data: &[u8]) -> Blake3Cv {
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(offset);
    hasher.update(data);
    Blake3Cv(hasher.finalize_non_root())
}

/// Merges the values of consecutive, equally sized leaves (the last may be shorter) into the value of
/// the subtree they form. With `root` the result is the BLAKE3 hash of the whole input; it needs at
/// least two leaves, since a single leaf's root hash cannot be derived from its chaining value.
pub fn merge_leaves(leaves: &[Blake3Cv], root: bool) -> Option<Blake3Cv> {
    match leaves.len() {
        0 => None,
        1 if root => None,
        1 => Some(leaves[0]),
        n => {
            let left_count = largest_power_of_two_below(n);
            let left = merge_leaves(&leaves[..left_count], false)?;
            let right = merge_leaves(&leaves[left_count..], false)?;
            Some(if root {
                Blake3Cv(*merge_subtrees_root(&left.0, &right.0, Mode::Hash).as_bytes())
            } else {
                Blake3Cv(merge_subtrees_non_root(&left.0, &right.0, Mode::Hash))
            })
        }
    }
}

/// The value of a whole block from its piece values (a block is a subtree of the file's tree).
pub fn block_cv(pieces: &[Blake3Cv]) -> Option<Blake3Cv> {
    merge_leaves(pieces, false)
}

/// Number of pieces in `len` bytes.
pub fn piece_count(len: u64) -> u64 {
    len.div_ceil(PIECE_BYTES)
}

fn largest_power_of_two_below(n: usize) -> usize {
    debug_assert!(n >= 2);
    let p = n.next_power_of_two();
    if p == n {
        n / 2
    } else {
        p / 2
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn file_hash_via_blocks(data: &[u8], block: usize) -> blake3::Hash {
        if data.len() as u64 <= PIECE_BYTES {
            return blake3::hash(data);
        }
        let mut blocks = Vec::new();
        let mut all_pieces = Vec::new();
        for (bi, b) in data.chunks(block).enumerate() {
            let pieces: Vec<Blake3Cv> = b
                .chunks(PIECE_BYTES as usize)
                .enumerate()
                .map(|(pi, p)| piece_cv((bi * block) as u64 + pi as u64 * PIECE_BYTES, p))
                .collect();
            all_pieces.extend(pieces.iter().copied());
            blocks.push(block_cv(&pieces).unwrap());
        }
        let from_pieces = merge_leaves(&all_pieces, true).unwrap();
        let h = if blocks.len() == 1 {
            from_pieces
        } else {
            merge_leaves(&blocks, true).unwrap()
        };
        assert_eq!(h, from_pieces);
        blake3::Hash::from(h.0)
    }

    #[test]
    fn merged_values_equal_blake3_hash_around_boundaries() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = vec![0u8; 700_000];
        rng.fill(&mut data[..]);
        let p = PIECE_BYTES as usize;
        let mut sizes = vec![
            0,
            1,
            1023,
            1024,
            1025,
            p - 1,
            p,
            p + 1,
            2 * p - 1,
            2 * p,
            2 * p + 1,
        ];
        sizes.extend([
            3 * p + 5,
            4 * p,
            4 * p + 1,
            5 * p - 1,
            8 * p + 1,
            10 * p + 17,
        ]);
        for size in sizes {
            for block in [p, 2 * p, 4 * p] {
                let d = &data[..size];
                assert_eq!(
                    file_hash_via_blocks(d, block),
                    blake3::hash(d),
                    "size {size} block {block}"
                );
            }
        }
    }

    #[test]
    fn block_sizes_are_checked() {
        assert!(validate_block_size(65536).is_ok());
        assert!(validate_block_size(128 << 20).is_ok());
        assert!(validate_block_size(65535).is_err());
        assert!(validate_block_size(3 * 65536).is_err());
        assert!(validate_block_size(32768).is_err());
        assert!(validate_block_size(2 << 30).is_err());
    }
}
