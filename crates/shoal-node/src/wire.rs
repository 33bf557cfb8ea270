//! Reading and writing `shoal-proto` frames on async streams.

use prost::Message;
use shoal_proto::frame::{self, HEADER_LEN};
use shoal_proto::{FrameError, Limit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The frame was malformed or too long.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream ended cleanly before a frame began.
    #[error("stream closed")]
    Closed,
}

/// Reads one frame of kind `limit` and decodes it. The length is checked
/// against the limit before the payload buffer is allocated.
pub async fn read_frame<M, R>(r: &mut R, limit: Limit) -> Result<M, WireError>
where
    M: Message + Default,
    R: AsyncRead + Unpin + ?Sized,
{
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                WireError::Closed
            } else {
                WireError::Frame(FrameError::Truncated {
                    expected: HEADER_LEN,
                    got,
                })
            });
        }
        got += n;
    }
    let len = frame::check_len(header, limit)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::Frame(FrameError::Truncated {
                expected: HEADER_LEN + len,
                got: HEADER_LEN,
            })
        } else {
            WireError::Io(e)
        }
    })?;
    Ok(frame::decode(&buf)?)
}

/// Encodes and writes one frame.
pub async fn write_frame<M, W>(w: &mut W, msg: &M) -> Result<(), WireError>
where
    M: Message,
    W: AsyncWrite + Unpin + ?Sized,
{
    w.write_all(&frame::encode(msg)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::pb;

    #[tokio::test]
    async fn frames_round_trip_and_lies_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let msg = pb::Request {
            kind: Some(pb::request::Kind::Pex(pb::Pex {
                hash: vec![7u8; 32].into(),
            })),
        };
        write_frame(&mut a, &msg).await.unwrap();
        let back: pb::Request = read_frame(&mut b, Limit::Request).await.unwrap();
        assert_eq!(back, msg);
        // A 4 GiB length prefix is refused from the header alone.
        a.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        let err = read_frame::<pb::Request, _>(&mut b, Limit::Request)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WireError::Frame(FrameError::TooLong { .. })),
            "{err}"
        );
        // A frame cut short is an error, not a hang.
        a.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        drop(a);
        let err = read_frame::<pb::Request, _>(&mut b, Limit::Request)
            .await
            .unwrap_err();
        assert!(
            matches!(err, WireError::Frame(FrameError::Truncated { .. })),
            "{err}"
        );
    }
}
