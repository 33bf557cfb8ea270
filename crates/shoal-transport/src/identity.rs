//! Node identities: an Ed25519 key pair, kept in a file, and the peer id
//! (the public key) that names a node on the network.

use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;
use ed25519_dalek::{SigningKey, VerifyingKey};

/// Length of a peer id's text form: 32 bytes in base32 without padding.
pub const PEER_ID_TEXT_LEN: usize = 52;

/// A node's identity: the Ed25519 secret key whose public half is its
/// [`PeerId`]. It signs the TLS handshake of every connection the node makes
/// or accepts.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// A new random identity.
    pub fn generate() -> Self {
        SecretKey(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// The peer id (public key) of this identity.
    pub fn public(&self) -> PeerId {
        PeerId(self.0.verifying_key().to_bytes())
    }

    /// The 32-byte Ed25519 seed. Keep it secret.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The identity with this 32-byte Ed25519 seed.
    pub fn from_bytes(bytes: &[u8; 32]) -> Self {
        SecretKey(SigningKey::from_bytes(bytes))
    }

    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.0
    }

    /// Load the identity kept at `path`, or create one there (file mode 0600)
    /// if there is no file yet.
    ///
    /// A file that exists but cannot be read, or does not hold a key, is an
    /// error: this never silently replaces an identity.
    pub fn load_or_create(path: &Path) -> Result<Self, IdentityError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse_file(path, &bytes),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(source) => Err(IdentityError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Load the identity kept at `path`; a missing file is an error too.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let bytes = std::fs::read(path).map_err(|source| IdentityError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse_file(path, &bytes)
    }

    /// The file form: the seed in lowercase base32, one line.
    fn file_text(&self) -> String {
        let mut text = encode_base32(&self.to_bytes());
        text.push('\n');
        text
    }

    fn parse_file(path: &Path, bytes: &[u8]) -> Result<Self, IdentityError> {
        let malformed = |reason: &'static str| IdentityError::Malformed {
            path: path.to_owned(),
            reason,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| malformed("not text"))?;
        let text = text.trim();
        if text.is_empty() {
            return Err(malformed("the file is empty"));
        }
        if text.len() != PEER_ID_TEXT_LEN {
            return Err(malformed("expected 52 base32 characters"));
        }
        let seed = decode_base32(text).ok_or_else(|| malformed("not base32"))?;
        let seed: [u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| malformed("expected 32 bytes"))?;
        warn_if_readable_by_others(path);
        Ok(SecretKey::from_bytes(&seed))
    }

    fn create(path: &Path) -> Result<Self, IdentityError> {
        let write_err = |source| IdentityError::Write {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(write_err)?;
        }
        let key = SecretKey::generate();
        // Write a private temporary file, then link it into place: a crash
        // leaves no half-written identity, and if another process created the
        // identity meanwhile, its key wins and we load that one.
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp_name);
        let written = write_private(&tmp, key.file_text().as_bytes());
        let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                tracing::info!(path = %path.display(), id = %key.public(), "created a new identity");
                Ok(key)
            }
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => Self::load(path),
            Err(err) => Err(write_err(err)),
        }
    }
}

fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn warn_if_readable_by_others(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(
                    path = %path.display(),
                    mode = format_args!("{:o}", mode & 0o777),
                    "identity file is readable by other users; chmod 600 it"
                );
            }
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(public: {})", self.public())
    }
}

/// A node's public identity: its 32-byte Ed25519 public key.
///
/// The text form is the lowercase base32 of the key without padding (52
/// characters, safe in URLs and shells); parsing ignores case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId([u8; 32]);

impl PeerId {
    /// The 32 key bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The peer id with these key bytes, which must be 32 bytes and a valid
    /// Ed25519 public key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PeerIdError> {
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| PeerIdError::Length(bytes.len()))?;
        VerifyingKey::from_bytes(&bytes).map_err(|_| PeerIdError::NotAKey)?;
        Ok(PeerId(bytes))
    }

    /// The first 8 characters of the text form, for logs.
    pub fn fmt_short(&self) -> String {
        let mut text = self.to_string();
        text.truncate(8);
        text
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_base32(&self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.fmt_short())
    }
}

impl FromStr for PeerId {
    type Err = PeerIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != PEER_ID_TEXT_LEN {
            return Err(PeerIdError::TextLength(s.len()));
        }
        let bytes = decode_base32(s).ok_or(PeerIdError::NotBase32)?;
        PeerId::from_bytes(&bytes)
    }
}

/// Lowercase RFC 4648 base32 without padding.
pub(crate) fn encode_base32(bytes: &[u8]) -> String {
    BASE32_NOPAD.encode(bytes).to_ascii_lowercase()
}

/// Decode base32 without padding, in either case.
pub(crate) fn decode_base32(text: &str) -> Option<Vec<u8>> {
    BASE32_NOPAD
        .decode(text.to_ascii_uppercase().as_bytes())
        .ok()
}

/// Why a peer id could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PeerIdError {
    /// The text is not 52 characters long.
    #[error("a peer id is 52 characters, not {0}")]
    TextLength(usize),
    /// The text has characters outside base32 (a-z, 2-7).
    #[error("a peer id is base32 (letters a-z and digits 2-7)")]
    NotBase32,
    /// The bytes are not 32 long.
    #[error("a peer id is 32 bytes, not {0}")]
    Length(usize),
    /// The bytes are not a valid Ed25519 public key.
    #[error("not a valid ed25519 public key")]
    NotAKey,
}

/// Why the identity file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The identity file exists but could not be read.
    #[error("cannot read identity file {}: {source}", path.display())]
    Read {
        /// The identity file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A new identity file could not be written.
    #[error("cannot write identity file {}: {source}", path.display())]
    Write {
        /// The identity file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The identity file does not hold a key.
    #[error("identity file {} is malformed ({reason}); move it away to create a new identity", path.display())]
    Malformed {
        /// The identity file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_id_text_round_trips_in_any_case() {
        let id = SecretKey::generate().public();
        let text = id.to_string();
        assert_eq!(text.len(), PEER_ID_TEXT_LEN);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        );
        assert_eq!(text.parse::<PeerId>(), Ok(id));
        assert_eq!(text.to_ascii_uppercase().parse::<PeerId>(), Ok(id));
        assert!(format!("{id:?}").len() < 20);
    }

    #[test]
    fn bad_peer_ids() {
        let id = SecretKey::generate().public().to_string();
        assert_eq!(id[..51].parse::<PeerId>(), Err(PeerIdError::TextLength(51)));
        let typo = format!("1{}", &id[1..]);
        assert_eq!(typo.parse::<PeerId>(), Err(PeerIdError::NotBase32));
        assert_eq!(PeerId::from_bytes(&[0; 31]), Err(PeerIdError::Length(31)));
    }

    #[test]
    fn identity_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("identity");
        let a = SecretKey::load_or_create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let b = SecretKey::load_or_create(&path).unwrap();
        assert_eq!(a.public(), b.public());
        assert_eq!(a.to_bytes(), b.to_bytes());
        // no temporary files left behind
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn malformed_identity_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity");
        for contents in [
            &b""[..],
            b"hello",
            &[0xff; 52],
            b"0000000000000000000000000000000000000000000000000000",
        ] {
            std::fs::write(&path, contents).unwrap();
            let err = SecretKey::load_or_create(&path).unwrap_err();
            assert!(
                matches!(err, IdentityError::Malformed { .. }),
                "{contents:?}: {err}"
            );
            assert!(err.to_string().contains("malformed"));
            // the file is left alone
            assert_eq!(std::fs::read(&path).unwrap(), contents);
        }
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_identity_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // a directory where the file should be cannot be read as a file
        let path = dir.path().join("identity");
        std::fs::create_dir(&path).unwrap();
        let err = SecretKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, IdentityError::Read { .. }), "{err}");
    }
}
