//! A stand-in for `shoal_transport::PeerId` until that crate exports it.
//!
//! Same shape and text form (32 bytes, lowercase unpadded base32), so the
//! switch is a one-line `pub use`.

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;

/// A peer's identity: its 32-byte Ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 32]);

/// The text was not a peer id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParsePeerIdError {
    /// The text is not base32.
    #[error("peer id is not base32")]
    NotBase32,
    /// The text decodes to something other than 32 bytes.
    #[error("peer id must be 32 bytes, got {0}")]
    WrongLength(usize),
}

impl PeerId {
    /// The id made of these 32 key bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<PeerId, ParsePeerIdError> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| ParsePeerIdError::WrongLength(bytes.len()))?;
        Ok(PeerId(array))
    }

    /// The 32 key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32_NOPAD.encode(&self.0).to_ascii_lowercase())
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({self})")
    }
}

impl FromStr for PeerId {
    type Err = ParsePeerIdError;

    fn from_str(s: &str) -> Result<PeerId, ParsePeerIdError> {
        let bytes = BASE32_NOPAD
            .decode(s.to_ascii_uppercase().as_bytes())
            .map_err(|_| ParsePeerIdError::NotBase32)?;
        PeerId::from_bytes(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        let id = PeerId([7; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), 52);
        assert_eq!(text, text.to_ascii_lowercase());
        assert_eq!(text.parse::<PeerId>(), Ok(id));
        assert_eq!("0189".parse::<PeerId>(), Err(ParsePeerIdError::NotBase32));
        assert_eq!(
            "mfrgg".parse::<PeerId>(),
            Err(ParsePeerIdError::WrongLength(3))
        );
    }
}
