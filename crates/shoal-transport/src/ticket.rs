//! Tickets: everything needed to fetch content, as one shell-safe token.
//!
//! The text form is fixed by `proto/shoal/v1/ticket.proto`: `shoal`
//! followed by the lowercase base32 (no padding) of one version byte (1) and
//! the encoded `Ticket` message.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use prost::Message;
use shoal_proto::pb;

use crate::identity::{PeerId, PeerIdError, decode_base32, encode_base32};

/// The text every ticket starts with.
pub const TICKET_PREFIX: &str = "shoal";
/// The version byte of the tickets this crate writes and reads.
pub const TICKET_VERSION: u8 = 1;
/// Most providers a ticket may list.
pub const MAX_PROVIDERS: usize = 16;
/// Most addresses a provider in a ticket may list.
pub const MAX_PROVIDER_ADDRS: usize = shoal_proto::limits::MAX_ADDRS;
/// Longest ticket text accepted; 16 providers with 16 IPv6 addresses each
/// fit.
pub const MAX_TICKET_LEN: usize = 16 * 1024;

/// What a ticket's hash names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TicketKind {
    /// A single blob.
    Blob,
    /// A collection: a blob listing other blobs.
    Collection,
}

/// A peer that has the content, and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Provider {
    /// The provider's peer id.
    pub id: PeerId,
    /// Addresses to dial it at.
    pub addrs: Vec<SocketAddr>,
}

/// A content hash, what it names, and peers that provide it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// The BLAKE3 hash of the blob (or of the collection's blob).
    pub hash: [u8; 32],
    /// Whether the hash names a blob or a collection.
    pub kind: TicketKind,
    /// Peers to fetch from.
    pub providers: Vec<Provider>,
}

impl Ticket {
    /// The protobuf form.
    pub fn to_proto(&self) -> pb::Ticket {
        pb::Ticket {
            hash: self.hash.to_vec().into(),
            kind: match self.kind {
                TicketKind::Blob => pb::BlobKind::Raw as i32,
                TicketKind::Collection => pb::BlobKind::Collection as i32,
            },
            providers: self
                .providers
                .iter()
                .map(|p| pb::TicketProvider {
                    id: p.id.as_bytes().to_vec().into(),
                    addrs: p.addrs.iter().map(|a| encode_addr(*a).into()).collect(),
                })
                .collect(),
        }
    }

    /// Read and check the protobuf form.
    pub fn from_proto(ticket: pb::Ticket) -> Result<Self, TicketError> {
        let hash = ticket
            .hash
            .as_ref()
            .try_into()
            .map_err(|_| TicketError::BadHash(ticket.hash.len()))?;
        let kind = match pb::BlobKind::try_from(ticket.kind) {
            Ok(pb::BlobKind::Raw) => TicketKind::Blob,
            Ok(pb::BlobKind::Collection) => TicketKind::Collection,
            Err(_) => return Err(TicketError::UnknownKind(ticket.kind)),
        };
        if ticket.providers.len() > MAX_PROVIDERS {
            return Err(TicketError::TooManyProviders(ticket.providers.len()));
        }
        let providers = ticket
            .providers
            .into_iter()
            .enumerate()
            .map(|(index, p)| {
                let id = PeerId::from_bytes(&p.id)
                    .map_err(|source| TicketError::BadProvider { index, source })?;
                if p.addrs.len() > MAX_PROVIDER_ADDRS {
                    return Err(TicketError::TooManyAddrs {
                        index,
                        count: p.addrs.len(),
                    });
                }
                let addrs = p
                    .addrs
                    .iter()
                    .map(|a| {
                        decode_addr(a).ok_or(TicketError::BadAddr {
                            index,
                            len: a.len(),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Provider { id, addrs })
            })
            .collect::<Result<_, _>>()?;
        Ok(Ticket {
            hash,
            kind,
            providers,
        })
    }
}

/// An address in the compact binary form of `ticket.proto`: 4 or 16
/// address bytes, then the port, big-endian.
pub fn encode_addr(addr: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(18);
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
        IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
    out
}

/// Read an address in the compact binary form.
pub fn decode_addr(bytes: &[u8]) -> Option<SocketAddr> {
    match bytes.len() {
        6 => {
            let ip: [u8; 4] = bytes[..4].try_into().ok()?;
            let port = u16::from_be_bytes([bytes[4], bytes[5]]);
            Some(SocketAddr::from((Ipv4Addr::from(ip), port)))
        }
        18 => {
            let ip: [u8; 16] = bytes[..16].try_into().ok()?;
            let port = u16::from_be_bytes([bytes[16], bytes[17]]);
            // An IPv4-mapped address (`::ffff:a.b.c.d`) is read as the IPv4
            // address it is, as `encode_addr` writes it: otherwise a ticket
            // would not print back to itself, and the mapped form cannot be
            // dialed from an IPv4-only socket (found by fuzzing).
            Some(SocketAddr::from((Ipv6Addr::from(ip).to_canonical(), port)))
        }
        _ => None,
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = self.to_proto();
        let mut bytes = Vec::with_capacity(1 + message.encoded_len() + CHECKSUM_LEN);
        bytes.push(TICKET_VERSION);
        message.encode_raw(&mut bytes);
        let check = checksum(&bytes);
        bytes.extend_from_slice(&check);
        write!(f, "{TICKET_PREFIX}{}", encode_base32(&bytes))
    }
}

impl FromStr for Ticket {
    type Err = TicketError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() > MAX_TICKET_LEN {
            return Err(TicketError::TooLong(s.len()));
        }
        let body = match s.get(..TICKET_PREFIX.len()) {
            Some(prefix) if prefix.eq_ignore_ascii_case(TICKET_PREFIX) => &s[TICKET_PREFIX.len()..],
            _ => return Err(TicketError::Prefix),
        };
        if body.is_empty() {
            return Err(TicketError::Empty);
        }
        let bytes = decode_base32(body).ok_or(TicketError::Encoding)?;
        let (&version, _) = bytes.split_first().ok_or(TicketError::Empty)?;
        if version != TICKET_VERSION {
            return Err(TicketError::Version(version));
        }
        let Some(split) = bytes.len().checked_sub(CHECKSUM_LEN).filter(|n| *n >= 1) else {
            return Err(TicketError::Corrupt);
        };
        let (payload, check) = bytes.split_at(split);
        if checksum(payload) != check {
            return Err(TicketError::Checksum);
        }
        let message = pb::Ticket::decode(&payload[1..]).map_err(|_| TicketError::Corrupt)?;
        Ticket::from_proto(message)
    }
}

/// Bytes of checksum at the end of a ticket.
pub(crate) const CHECKSUM_LEN: usize = 4;

/// The checksum that ends a ticket: the first bytes of the BLAKE3 hash of
/// everything before it, so that a mistyped character is caught instead of
/// naming other content or another peer.
fn checksum(payload: &[u8]) -> [u8; CHECKSUM_LEN] {
    let h = blake3::hash(payload);
    let mut c = [0u8; CHECKSUM_LEN];
    c.copy_from_slice(&h.as_bytes()[..CHECKSUM_LEN]);
    c
}

/// Why a ticket could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TicketError {
    /// The text does not start with `shoal`.
    #[error("not a shoal ticket: a ticket starts with \"shoal\"")]
    Prefix,
    /// Nothing follows the prefix.
    #[error("the ticket is empty after \"shoal\"")]
    Empty,
    /// The text is longer than any valid ticket.
    #[error("the ticket is too long ({0} characters)")]
    TooLong(usize),
    /// The text after the prefix is not base32 of a whole number of bytes.
    #[error(
        "the ticket is mistyped, cut short or has extra characters (after \"shoal\" come only \
         letters a-z and digits 2-7, in a length a ticket can have)"
    )]
    Encoding,
    /// The version byte is not one this program reads.
    #[error("ticket version {0} is not supported (this program reads version 1); upgrade shoal")]
    Version(u8),
    /// The checksum does not match: a character was mistyped.
    #[error("the ticket is mistyped: its checksum does not match (copy it again)")]
    Checksum,
    /// The bytes do not decode as a ticket message.
    #[error("the ticket is corrupted or cut short")]
    Corrupt,
    /// The hash is not 32 bytes.
    #[error("the ticket's hash has {0} bytes, not 32")]
    BadHash(usize),
    /// The kind is not blob or collection.
    #[error("the ticket names an unknown kind of content ({0}); upgrade shoal")]
    UnknownKind(i32),
    /// Too many providers.
    #[error("the ticket lists {0} providers, more than the 16 allowed")]
    TooManyProviders(usize),
    /// A provider's id is not a valid key.
    #[error("provider {index} of the ticket has a bad id: {source}")]
    BadProvider {
        /// Position in the provider list.
        index: usize,
        /// What is wrong with the id.
        source: PeerIdError,
    },
    /// A provider lists too many addresses.
    #[error("provider {index} of the ticket lists {count} addresses, more than the 16 allowed")]
    TooManyAddrs {
        /// Position in the provider list.
        index: usize,
        /// Addresses listed.
        count: usize,
    },
    /// An address is not 6 or 18 bytes.
    #[error("provider {index} of the ticket has a malformed address ({len} bytes)")]
    BadAddr {
        /// Position in the provider list.
        index: usize,
        /// Length of the address.
        len: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretKey;
    use proptest::prelude::*;

    fn sample() -> Ticket {
        Ticket {
            hash: [7; 32],
            kind: TicketKind::Blob,
            providers: vec![Provider {
                id: SecretKey::from_bytes(&[1; 32]).public(),
                addrs: vec![
                    "192.168.100.200:65000".parse().unwrap(),
                    "[2001:db8::1]:7000".parse().unwrap(),
                ],
            }],
        }
    }

    #[test]
    fn one_provider_with_two_addrs_is_short() {
        let text = sample().to_string();
        assert!(text.len() < 200, "{} chars: {text}", text.len());
        assert!(text.starts_with("shoal"));
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
        );
        assert_eq!(text.parse::<Ticket>(), Ok(sample()));
        assert_eq!(text.to_ascii_uppercase().parse::<Ticket>(), Ok(sample()));
    }

    #[test]
    fn every_one_character_typo_is_caught() {
        let good = sample().to_string();
        let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
        for i in TICKET_PREFIX.len()..good.len() {
            let mut typo = good.clone().into_bytes();
            let pos = alphabet.iter().position(|c| *c == typo[i]).unwrap();
            typo[i] = alphabet[(pos + 1) % alphabet.len()];
            let typo = String::from_utf8(typo).unwrap();
            assert!(
                typo.parse::<Ticket>().is_err(),
                "typo at {i} was accepted: {typo}"
            );
        }
    }

    #[test]
    fn bad_tickets() {
        let good = sample().to_string();
        let check = |text: &str, want: TicketError| {
            assert_eq!(text.parse::<Ticket>(), Err(want), "{text}");
        };
        check("", TicketError::Prefix);
        check("hello world", TicketError::Prefix);
        check("shoal", TicketError::Empty);
        check(&format!("x{good}"), TicketError::Prefix);
        // a typo: a character outside the alphabet
        check(&format!("shoal1{}", &good[6..]), TicketError::Encoding);
        check(
            &format!("shoal{}8", &good[5..good.len() - 1]),
            TicketError::Encoding,
        );
        check(&format!("{good}!"), TicketError::Encoding);
        // cut short by one character makes a bad base32 length or bad bits
        assert!(good[..good.len() - 1].parse::<Ticket>().is_err());
        // cut short in the middle
        assert!(good[..good.len() / 2].parse::<Ticket>().is_err());
        // unknown version
        let mut bytes = vec![2u8];
        sample().to_proto().encode_raw(&mut bytes);
        let c = checksum(&bytes);
        bytes.extend_from_slice(&c);
        check(
            &format!("shoal{}", encode_base32(&bytes)),
            TicketError::Version(2),
        );
        // wrong sizes inside
        let mut proto = sample().to_proto();
        proto.hash.truncate(31);
        let mut bytes = vec![1u8];
        proto.encode_raw(&mut bytes);
        let c = checksum(&bytes);
        bytes.extend_from_slice(&c);
        check(
            &format!("shoal{}", encode_base32(&bytes)),
            TicketError::BadHash(31),
        );
        let mut proto = sample().to_proto();
        proto.providers = vec![proto.providers[0].clone(); 17];
        assert_eq!(
            Ticket::from_proto(proto),
            Err(TicketError::TooManyProviders(17))
        );
        let mut proto = sample().to_proto();
        proto.providers[0].addrs = vec![vec![1, 2, 3, 4, 5, 6].into(); 17];
        assert!(matches!(
            Ticket::from_proto(proto),
            Err(TicketError::TooManyAddrs { .. })
        ));
        let mut proto = sample().to_proto();
        proto.providers[0].addrs[0].truncate(5);
        assert!(matches!(
            Ticket::from_proto(proto),
            Err(TicketError::BadAddr { len: 5, .. })
        ));
        let mut proto = sample().to_proto();
        proto.kind = 9;
        assert_eq!(Ticket::from_proto(proto), Err(TicketError::UnknownKind(9)));
        // too long
        check(
            &format!("shoal{}", "a".repeat(MAX_TICKET_LEN)),
            TicketError::TooLong(MAX_TICKET_LEN + 5),
        );
        // errors read well
        let msg = "shoalzzzz".parse::<Ticket>().unwrap_err().to_string();
        assert!(
            msg.starts_with("the ticket") || msg.contains("ticket"),
            "{msg}"
        );
    }

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| {
                let ip = Ipv6Addr::from(ip);
                // mapped IPv4 is written as plain IPv4
                SocketAddr::new(ip.to_canonical(), port)
            }),
        ]
    }

    fn arb_ticket() -> impl Strategy<Value = Ticket> {
        let provider = (
            any::<[u8; 32]>(),
            proptest::collection::vec(arb_addr(), 0..=MAX_PROVIDER_ADDRS),
        )
            .prop_map(|(seed, addrs)| Provider {
                id: SecretKey::from_bytes(&seed).public(),
                addrs,
            });
        (
            any::<[u8; 32]>(),
            any::<bool>(),
            proptest::collection::vec(provider, 0..=MAX_PROVIDERS),
        )
            .prop_map(|(hash, collection, providers)| Ticket {
                hash,
                kind: if collection {
                    TicketKind::Collection
                } else {
                    TicketKind::Blob
                },
                providers,
            })
    }

    proptest! {
        #[test]
        fn tickets_round_trip(ticket in arb_ticket()) {
            let text = ticket.to_string();
            prop_assert!(text.len() <= MAX_TICKET_LEN);
            prop_assert_eq!(text.parse::<Ticket>(), Ok(ticket));
        }

        #[test]
        fn any_string_is_a_ticket_or_an_error(s in "\\PC*") {
            let _ = s.parse::<Ticket>();
        }

        #[test]
        fn any_base32_is_a_ticket_or_an_error(s in "shoal[a-z2-7]{0,300}") {
            let _ = s.parse::<Ticket>();
        }

        #[test]
        fn random_bytes_are_rarely_tickets(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let text = format!("shoal{}", encode_base32(&bytes));
            if let Ok(t) = text.parse::<Ticket>() {
                // the only way random bytes decode is as a real ticket
                prop_assert_eq!(t.to_string().parse::<Ticket>(), Ok(t));
            }
        }
    }
}
