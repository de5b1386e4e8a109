//! Framing: an 8-byte header (body length, message kind, encoding version, flags) then a postcard body.
//! Bulk data travels as pieces: a 36-byte piece header (length, chaining value) then the raw bytes.
//! Every length is checked against its limit before anything is allocated for it.

use serde::{de::DeserializeOwned, Serialize};

use crate::checksum::PIECE_BYTES;
use crate::error::{DecodeError, WireError};
use crate::ids::Blake3Cv;

/// Upper bound on a message frame's body (a 1 GiB block's checksum list is 512 KiB).
pub const MAX_FRAME_BYTES: u32 = 4 << 20;

/// Length of the frame header.
pub const HEADER_BYTES: usize = 8;

/// Length of a piece header.
pub const PIECE_HEADER_BYTES: usize = 36;

/// The postcard encoding version this build writes and reads.
pub const ENCODING_VERSION: u8 = 1;

/// Message kinds: which enum the body holds. Numbers are never reused.
pub mod kind {
    /// `ClientToNamenode`.
    pub const CLIENT_TO_NAMENODE: u16 = 1;
    /// `NamenodeReply`.
    pub const NAMENODE_REPLY: u16 = 2;
    /// `DatanodeToNamenode`.
    pub const DATANODE_TO_NAMENODE: u16 = 3;
    /// `NamenodeToDatanode`.
    pub const NAMENODE_TO_DATANODE: u16 = 4;
    /// `DatanodeRequest`.
    pub const DATANODE_REQUEST: u16 = 5;
    /// `DatanodeReply`.
    pub const DATANODE_REPLY: u16 = 6;
    /// `PeerPart` of a request from one member of the namenode group to another.
    pub const NAMENODE_PEER: u16 = 7;
    /// `PeerPart` of the reply to a `NAMENODE_PEER` request.
    pub const NAMENODE_PEER_REPLY: u16 = 8;
    /// `WireError`, in place of any reply.
    pub const ERROR: u16 = 15;
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Body length in bytes.
    pub len: u32,
    /// Message kind.
    pub kind: u16,
    /// Body encoding version.
    pub version: u8,
}

impl FrameHeader {
    /// Decodes and checks a header: the length limit and the encoding version.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<FrameHeader, DecodeError> {
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let kind = u16::from_le_bytes([bytes[4], bytes[5]]);
        let version = bytes[6];
        if len > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge {
                len: len.into(),
                max: MAX_FRAME_BYTES.into(),
            });
        }
        if version != ENCODING_VERSION {
            return Err(DecodeError::Version(version));
        }
        Ok(FrameHeader { len, kind, version })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[..4].copy_from_slice(&self.len.to_le_bytes());
        out[4..6].copy_from_slice(&self.kind.to_le_bytes());
        out[6] = self.version;
        out
    }
}

/// Encodes one message as a whole frame.
pub fn encode_frame<T: Serialize>(kind: u16, message: &T) -> Result<Vec<u8>, DecodeError> {
    let body = postcard::to_stdvec(message).map_err(|e| DecodeError::Body(e.to_string()))?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_FRAME_BYTES)
        .ok_or(DecodeError::TooLarge {
            len: body.len() as u64,
            max: MAX_FRAME_BYTES.into(),
        })?;
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(
        &FrameHeader {
            len,
            kind,
            version: ENCODING_VERSION,
        }
        .encode(),
    );
    out.extend_from_slice(&body);
    Ok(out)
}

/// What a frame body turned out to hold.
#[derive(Debug)]
pub enum Decoded<T> {
    /// The expected message.
    Message(T),
    /// The peer answered with an error.
    Error(WireError),
}

/// Decodes a frame body of the given header, expecting `expected` kind (or an error frame).
pub fn decode_body<T: DeserializeOwned>(
    header: FrameHeader,
    expected: u16,
    body: &[u8],
) -> Result<Decoded<T>, DecodeError> {
    match header.kind {
        k if k == expected => postcard::from_bytes(body)
            .map(Decoded::Message)
            .map_err(|e| DecodeError::Body(e.to_string())),
        kind::ERROR => postcard::from_bytes(body)
            .map(Decoded::Error)
            .map_err(|e| DecodeError::Body(e.to_string())),
        got => Err(DecodeError::UnexpectedKind { got, expected }),
    }
}

/// A piece header: the piece's length (0 ends the stream of pieces) and its chaining value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceHeader {
    /// Bytes of data that follow, at most `PIECE_BYTES`.
    pub len: u32,
    /// Chaining value of the piece at its offset in the file.
    pub cv: Blake3Cv,
}

impl PieceHeader {
    /// The end-of-pieces marker.
    pub const END: PieceHeader = PieceHeader {
        len: 0,
        cv: Blake3Cv([0; 32]),
    };

    /// Encodes the header.
    pub fn encode(&self) -> [u8; PIECE_HEADER_BYTES] {
        let mut out = [0u8; PIECE_HEADER_BYTES];
        out[..4].copy_from_slice(&self.len.to_le_bytes());
        out[4..].copy_from_slice(&self.cv.0);
        out
    }

    /// Decodes a header and checks the length limit.
    pub fn decode(bytes: &[u8; PIECE_HEADER_BYTES]) -> Result<PieceHeader, DecodeError> {
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if u64::from(len) > PIECE_BYTES {
            return Err(DecodeError::TooLarge {
                len: len.into(),
                max: PIECE_BYTES,
            });
        }
        let mut cv = [0u8; 32];
        cv.copy_from_slice(&bytes[4..]);
        Ok(PieceHeader {
            len,
            cv: Blake3Cv(cv),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ClientToNamenode;

    #[test]
    fn oversized_header_is_refused_before_allocation() {
        let h = FrameHeader {
            len: MAX_FRAME_BYTES + 1,
            kind: 1,
            version: ENCODING_VERSION,
        };
        assert!(matches!(
            FrameHeader::decode(&h.encode()),
            Err(DecodeError::TooLarge { .. })
        ));
        let bad_version = FrameHeader {
            len: 3,
            kind: 1,
            version: 9,
        };
        assert_eq!(
            FrameHeader::decode(&bad_version.encode()),
            Err(DecodeError::Version(9))
        );
    }

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let msg = ClientToNamenode::Stat {
            path: "/a/b".into(),
            blocks: true,
        };
        let bytes = encode_frame(kind::CLIENT_TO_NAMENODE, &msg).unwrap();
        let header = FrameHeader::decode(bytes[..HEADER_BYTES].try_into().unwrap()).unwrap();
        let back: Decoded<ClientToNamenode> =
            decode_body(header, kind::CLIENT_TO_NAMENODE, &bytes[HEADER_BYTES..]).unwrap();
        assert!(matches!(back, Decoded::Message(m) if m == msg));
        let wrong =
            decode_body::<ClientToNamenode>(header, kind::DATANODE_REQUEST, &bytes[HEADER_BYTES..]);
        assert!(matches!(wrong, Err(DecodeError::UnexpectedKind { .. })));
        let garbage =
            decode_body::<ClientToNamenode>(header, kind::CLIENT_TO_NAMENODE, &[0xff; 40]);
        assert!(matches!(garbage, Err(DecodeError::Body(_))));
    }

    #[test]
    fn piece_headers_are_limited() {
        let h = PieceHeader {
            len: PIECE_BYTES as u32,
            cv: Blake3Cv([7; 32]),
        };
        assert_eq!(PieceHeader::decode(&h.encode()).unwrap(), h);
        let mut big = h.encode();
        big[..4].copy_from_slice(&(PIECE_BYTES as u32 + 1).to_le_bytes());
        assert!(PieceHeader::decode(&big).is_err());
    }
}
