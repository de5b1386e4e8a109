//! One entry point per fuzz target: each feeds arbitrary bytes to a decoder that reads a peer's or
//! a disk's bytes, and checks that it returns (an error is fine) without panicking, without
//! allocating what a length merely claims, and, where a value decodes, that it encodes back to a
//! value that decodes the same. The libFuzzer binaries in `fuzz_targets/` call these; the test in
//! `tests/corpus.rs` replays every file of `corpus/<target>/` through them, so CI keeps what the
//! fuzzers found fixed.

use lode_protocol::frame::{self, kind, Decoded, FrameHeader, PieceHeader, HEADER_BYTES};
use lode_protocol::messages::{
    ClientToNamenode, DatanodeReply, DatanodeRequest, DatanodeToNamenode, NamenodeReply,
    NamenodeToDatanode,
};
use serde::{de::DeserializeOwned, Serialize};

/// A fuzz target: arbitrary bytes in, a panic when a rule breaks.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_header", frame_header),
    ("message", message),
    ("frame_stream", frame_stream),
    ("sidecar", sidecar),
    ("edit_log", edit_log),
    ("metadata", metadata),
    ("plugin_wire", plugin_wire),
];

/// Frame and piece headers: lengths are checked against their limits.
pub fn frame_header(data: &[u8]) {
    if let Some(h) = data.get(..HEADER_BYTES) {
        let h: [u8; HEADER_BYTES] = h.try_into().expect("8 bytes");
        if let Ok(header) = FrameHeader::decode(&h) {
            assert!(header.len <= frame::MAX_FRAME_BYTES);
            // Byte 7 is reserved and ignored; the fields encode back as they came.
            assert_eq!(header.encode()[..7], h[..7]);
        }
    }
    if let Some(p) = data.get(..frame::PIECE_HEADER_BYTES) {
        let p: [u8; frame::PIECE_HEADER_BYTES] = p.try_into().expect("36 bytes");
        if let Ok(piece) = PieceHeader::decode(&p) {
            assert!(u64::from(piece.len) <= lode_protocol::checksum::PIECE_BYTES);
        }
    }
}

fn body<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(k: u16, body: &[u8]) {
    let header = FrameHeader {
        len: body.len() as u32,
        kind: k,
        version: frame::ENCODING_VERSION,
    };
    if let Ok(Decoded::Message(m)) = frame::decode_body::<T>(header, k, body) {
        // What decodes encodes again, and that decodes to the same value.
        let again = frame::encode_frame(k, &m).expect("a decoded message encodes");
        let h = FrameHeader::decode(again[..HEADER_BYTES].try_into().expect("header"))
            .expect("own header");
        match frame::decode_body::<T>(h, k, &again[HEADER_BYTES..]) {
            Ok(Decoded::Message(back)) => assert_eq!(back, m),
            other => panic!("re-encoded message does not decode: {other:?}"),
        }
    }
}

/// Message bodies of every direction; the first byte picks the message type.
pub fn message(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => body::<ClientToNamenode>(kind::CLIENT_TO_NAMENODE, rest),
        1 => body::<NamenodeReply>(kind::NAMENODE_REPLY, rest),
        2 => body::<DatanodeToNamenode>(kind::DATANODE_TO_NAMENODE, rest),
        3 => body::<NamenodeToDatanode>(kind::NAMENODE_TO_DATANODE, rest),
        4 => body::<DatanodeRequest>(kind::DATANODE_REQUEST, rest),
        _ => body::<DatanodeReply>(kind::DATANODE_REPLY, rest),
    }
}

/// A stream of frames as a server reads them: header, then a body of the length it states (only
/// what is there), then the next; paged replies are joined as a client joins them.
pub fn frame_stream(data: &[u8]) {
    let mut rest = data;
    let mut first: Option<NamenodeReply> = None;
    while let Some(h) = rest.get(..HEADER_BYTES) {
        let Ok(header) = FrameHeader::decode(h.try_into().expect("8 bytes")) else {
            return;
        };
        let Some(b) = rest.get(HEADER_BYTES..HEADER_BYTES + header.len as usize) else {
            return;
        };
        rest = &rest[HEADER_BYTES + header.len as usize..];
        match frame::decode_body::<NamenodeReply>(header, kind::NAMENODE_REPLY, b) {
            Ok(Decoded::Message(m)) => match &mut first {
                None => first = Some(m),
                Some(f) => {
                    let _ = lode_protocol::paging::join_reply(f, m);
                }
            },
            Ok(Decoded::Error(_)) | Err(_) => return,
        }
    }
}

/// A datanode's sidecar file.
pub fn sidecar(data: &[u8]) {
    if let Ok(s) = lode_datanode::store::Sidecar::decode(data) {
        assert_eq!(
            s.pieces.len() as u64,
            lode_protocol::checksum::piece_count(s.len)
        );
    }
}

/// An edit-log segment, both as the current segment (a torn tail may be cut) and as a rolled one.
pub fn edit_log(data: &[u8]) {
    let path = std::path::Path::new("fuzz");
    for torn in [true, false] {
        if let Ok((records, end)) = lode_namenode::editlog::decode_segment(data, path, torn) {
            assert!(end as usize <= data.len());
            for w in records.windows(2) {
                assert_eq!(w[1].0, w[0].0 + 1, "sequence numbers follow on");
            }
        }
    }
}

/// Values of the metadata store and metadata backups (a checkpoint is one).
pub fn metadata(data: &[u8]) {
    let _ = lode_namenode::namespace::decode_inode(data);
    let _ = lode_namenode::namespace::decode_block(data);
    if let Ok(Some((node, blocks))) = lode_namenode::namespace::upgrade_v1(data) {
        if let lode_namenode::namespace::InodeKind::File { block_count, .. } = node.kind {
            assert_eq!(block_count, blocks.len() as u64);
        }
    }
    if let Ok((_, pairs)) = lode_namenode::backup::parse(data) {
        let total: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(total <= data.len());
    }
}

/// The plugin host's control message (parent to child).
pub fn plugin_wire(data: &[u8]) {
    if let Ok((req, limits)) = lode_plugin_host::wire::decode(data) {
        let again = lode_plugin_host::wire::encode(&req, limits);
        assert_eq!(
            lode_plugin_host::wire::decode(&again).expect("re-encoded"),
            (req, limits)
        );
    }
}
