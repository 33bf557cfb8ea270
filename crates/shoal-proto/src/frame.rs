//! Frames: a 4-byte big-endian length, then one protobuf message.
//!
//! Written by hand because it is ten lines and the limit check must happen
//! before allocation, per message kind, which generic codecs do not offer.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// The largest message of each kind that will be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// A peer `Request` (hello, who, get, subscribe, pex).
    Request,
    /// A peer `Response` (including a `WhoAnswer` for 256 hashes).
    Response,
    /// One `HaveUpdate`.
    HaveUpdate,
    /// A control-socket request.
    ControlRequest,
    /// A control-socket response (may carry a 1 MiB data block).
    ControlResponse,
}

impl Limit {
    /// The limit in bytes.
    pub const fn bytes(self) -> usize {
        match self {
            Limit::Request => 64 * 1024,
            Limit::Response => 1024 * 1024,
            Limit::HaveUpdate => 128 * 1024,
            Limit::ControlRequest => 1024 * 1024,
            Limit::ControlResponse => 2 * 1024 * 1024,
        }
    }
}

/// What can be wrong with a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The length prefix exceeds the limit for this message kind.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLong {
        /// The announced length.
        len: u64,
        /// The limit that applied.
        limit: usize,
    },
    /// The frame's bytes are not a valid message.
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The input ended inside a frame.
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the header announced (plus header).
        expected: usize,
        /// Bytes available.
        got: usize,
    },
}

/// Check a frame header against `limit`; returns the payload length.
pub fn check_len(header: [u8; HEADER_LEN], limit: Limit) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > limit.bytes() {
        return Err(FrameError::TooLong {
            len: len as u64,
            limit: limit.bytes(),
        });
    }
    Ok(len)
}

/// Encode `msg` as one frame.
///
/// Panics never; a message larger than `u32::MAX` cannot be built by shoal
/// (every limit is far below), and is refused by [`check_len`] on the other
/// side anyway, so the length is saturated rather than checked here.
pub fn encode<M: Message>(msg: &M) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = BytesMut::with_capacity(HEADER_LEN + len);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a buffer with enough capacity cannot fail.
    let _ = msg.encode(&mut buf);
    buf.freeze()
}

/// Decode a frame payload (without header) as `M`.
pub fn decode<M: Message + Default>(payload: &[u8]) -> Result<M, FrameError> {
    Ok(M::decode(payload)?)
}

/// Decode one whole frame (header and payload) from the front of `buf`,
/// returning the message and the bytes consumed. For in-memory use (tests,
/// fuzzing); streams read the header first and call [`check_len`].
pub fn decode_one<M: Message + Default>(
    buf: &[u8],
    limit: Limit,
) -> Result<(M, usize), FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN,
            got: buf.len(),
        });
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(header);
    let len = check_len(h, limit)?;
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN + len,
            got: buf.len(),
        });
    };
    Ok((decode(payload)?, HEADER_LEN + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;
    use bytes::Bytes;
    use proptest::prelude::*;

    #[test]
    fn a_4_gib_length_is_refused_from_the_header_alone() {
        let err = check_len([0xff; 4], Limit::Response).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLong {
                len: 0xffff_ffff,
                ..
            }
        ));
        // And the whole-buffer decoder refuses it without needing the bytes.
        let err =
            decode_one::<pb::Request>(&[0xff, 0xff, 0xff, 0xff, 1], Limit::Request).unwrap_err();
        assert!(matches!(err, FrameError::TooLong { .. }));
    }

    #[test]
    fn each_kind_has_its_own_limit() {
        let len = (Limit::Request.bytes() + 1) as u32;
        assert!(check_len(len.to_be_bytes(), Limit::Request).is_err());
        assert_eq!(
            check_len(len.to_be_bytes(), Limit::Response).ok(),
            Some(len as usize)
        );
    }

    #[test]
    fn unknown_request_kinds_decode_to_none() {
        // Field 99, varint 1: a request kind from a future version.
        let payload = [0x98, 0x06, 0x01];
        let req: pb::Request = decode(&payload).unwrap();
        assert!(req.kind.is_none());
    }

    fn request() -> impl Strategy<Value = pb::Request> {
        use pb::request::Kind;
        let hash = proptest::collection::vec(any::<u8>(), 32).prop_map(Bytes::from);
        prop_oneof![
            (
                any::<u32>(),
                ".{0,64}",
                proptest::collection::vec(".{0,30}", 0..4)
            )
                .prop_map(|(v, a, l)| Kind::Hello(pb::Hello {
                    version: v,
                    agent: a,
                    listen_addrs: l,
                    capabilities: vec!["pex".into()],
                    instance: Default::default(),
                })),
            proptest::collection::vec(hash.clone(), 0..8)
                .prop_map(|h| Kind::Who(pb::Who { hashes: h })),
            (hash.clone(), proptest::collection::vec(any::<u64>(), 0..10)).prop_map(|(h, d)| {
                Kind::Get(pb::Get {
                    hash: h,
                    ranges: Some(pb::GroupRanges { deltas: d }),
                })
            }),
            proptest::collection::vec(hash.clone(), 0..8)
                .prop_map(|h| Kind::Subscribe(pb::Subscribe { hashes: h })),
            proptest::collection::vec(hash.clone(), 0..8)
                .prop_map(|h| Kind::GetBlobs(pb::GetBlobs { hashes: h })),
            hash.prop_map(|h| Kind::Pex(pb::Pex { hash: h })),
        ]
        .prop_map(|k| pb::Request { kind: Some(k) })
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in request()) {
            let frame = encode(&req);
            let (back, used) = decode_one::<pb::Request>(&frame, Limit::Request).unwrap();
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back, req);
        }

        #[test]
        fn truncated_frames_are_errors(req in request(), cut in 0usize..1000) {
            let frame = encode(&req);
            let cut = cut % frame.len();
            prop_assert!(decode_one::<pb::Request>(&frame[..cut], Limit::Request).is_err());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode_one::<pb::Request>(&bytes, Limit::Request);
            let _ = decode_one::<pb::Response>(&bytes, Limit::Response);
            let _ = decode_one::<pb::HaveUpdate>(&bytes, Limit::HaveUpdate);
            let _ = decode_one::<pb::ControlRequest>(&bytes, Limit::ControlRequest);
            let _ = decode_one::<pb::Manifest>(&bytes, Limit::Response);
            let _ = decode_one::<pb::Ticket>(&bytes, Limit::Request);
        }
    }
}
