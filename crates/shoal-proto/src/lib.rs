//! Shoal's wire protocol, version 1: the protobuf messages (generated from
//! `proto/shoal/v1/*.proto` at build time by `protox` and `prost-build`), the
//! length-delimited frame format with a hard size limit per message kind, and
//! the compact encoding of chunk-group ranges.
//!
//! This crate owns the *shape* of every byte that crosses a peer connection or
//! the local control socket. It deliberately does no I/O (no tokio, no quinn,
//! no store): callers read the 4-byte frame header themselves, ask
//! [`frame::check_len`] whether to go on, read that many bytes and call
//! [`frame::decode`]. Decoding any byte string gives a value or an error,
//! never a panic.

pub mod frame;
pub mod ranges;

/// The generated protobuf types of package `shoal.v1`.
#[allow(missing_docs, unreachable_pub, clippy::all, unused_qualifications)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/shoal.v1.rs"));
}

pub use frame::{FrameError, Limit};
pub use ranges::{GroupRanges, RangesError};

/// Protocol version carried in `Hello` and, as `shoal/1`, in ALPN.
pub const PROTOCOL_VERSION: u32 = 1;

/// The ALPN identifier of protocol version 1.
pub const ALPN: &[u8] = b"shoal/1";

/// Bytes in one chunk group: the unit of verification, request and have.
pub const GROUP_SIZE: u64 = 16 * 1024;

/// log2 of the number of 1 KiB BLAKE3 chunks in a group (16 = 2^4).
pub const GROUP_CHUNK_LOG: u8 = 4;

/// Number of chunk groups a blob of `size` bytes has (a 0-byte blob has one,
/// empty, group: its hash still has to be proven).
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(GROUP_SIZE).max(1)
}

/// Hard limits on what a peer may send; every count from the network is
/// checked against these before it is trusted.
pub mod limits {
    /// Hashes in one `Who`, `Subscribe` or `GetBlobs`.
    pub const MAX_HASHES_PER_REQUEST: usize = 256;
    /// Peers in one `PexAnswer`.
    pub const MAX_PEX_PEERS: usize = 64;
    /// Addresses in one `Hello` or `PeerInfo`.
    pub const MAX_ADDRS: usize = 16;
    /// Bytes of a `Hello.agent`.
    pub const MAX_AGENT_LEN: usize = 64;
    /// Bytes of a `Hello.instance` (longer ones are ignored).
    pub const MAX_INSTANCE_LEN: usize = 32;
    /// Bytes of an `Error.message`.
    pub const MAX_ERROR_MESSAGE: usize = 256;
    /// The largest blob served whole by `GetBlobs` (4 chunk groups).
    pub const MAX_SMALL_BLOB: u64 = 64 * 1024;
    /// Content bytes in one `GetBlobs` answer.
    pub const MAX_GET_BLOBS_BYTES: u64 = 4 << 20;
}

/// Check that `bytes` is a 32-byte hash and return it.
pub fn hash_from_bytes(bytes: &[u8]) -> Result<[u8; 32], RangesError> {
    bytes
        .try_into()
        .map_err(|_| RangesError::BadHash(bytes.len()))
}

/// A short human text for an error code.
pub fn error_code_name(code: i32) -> &'static str {
    match pb::ErrorCode::try_from(code) {
        Ok(pb::ErrorCode::NotFound) => "not found",
        Ok(pb::ErrorCode::Busy) => "busy or rate limited",
        Ok(pb::ErrorCode::BadRequest) => "bad request",
        Ok(pb::ErrorCode::UnsupportedVersion) => "unsupported protocol version",
        Ok(pb::ErrorCode::Internal) => "internal error",
        _ => "unknown error",
    }
}

/// Build an error response.
pub fn error_response(code: pb::ErrorCode, message: impl Into<String>) -> pb::Response {
    let mut message: String = message.into();
    if message.len() > limits::MAX_ERROR_MESSAGE {
        let mut end = limits::MAX_ERROR_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    pb::Response {
        kind: Some(pb::response::Kind::Error(pb::Error {
            code: code as i32,
            message,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_counts() {
        for (size, groups) in [(0, 1), (1, 1), (16384, 1), (16385, 2), (1 << 30, 65536)] {
            assert_eq!(group_count(size), groups, "size {size}");
        }
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let r = error_response(pb::ErrorCode::Internal, "é".repeat(300));
        let Some(pb::response::Kind::Error(e)) = r.kind else {
            panic!("not an error")
        };
        assert!(e.message.len() <= limits::MAX_ERROR_MESSAGE);
        assert_eq!(error_code_name(e.code), "internal error");
    }
}
