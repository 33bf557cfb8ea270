//! What the node knows about other peers: their listen addresses, which
//! hashes they were seen with (the source of peer exchange), and how many
//! bytes moved each way.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;

use shoal_store::Hash;
use shoal_transport::PeerId;

/// Peers remembered per hash for peer exchange.
const MAX_PEERS_PER_HASH: usize = 256;
/// Hashes this node holds or fetches remembered for peer exchange.
const MAX_HASHES: usize = 4096;
/// Hashes this node has none of remembered for peer exchange (it tells a
/// peer who else asked about them, as a tracker would). Kept apart, so
/// that a peer asking about many made-up hashes pushes out only these.
const MAX_RELAYED: usize = 1024;
/// Addresses remembered per peer.
const MAX_ADDRS: usize = 16;
/// Peers whose addresses are remembered.
const MAX_PEERS: usize = 65536;

/// Byte counters for one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerCounters {
    /// Bytes of blob data we sent to it.
    pub uploaded: u64,
    /// Bytes of verified blob data we received from it.
    pub downloaded: u64,
}

#[derive(Debug, Default)]
pub(crate) struct PeerBook {
    addrs: HashMap<PeerId, Vec<SocketAddr>>,
    /// Peers seen with each hash, most recent first, and whether this node
    /// held the hash when it was recorded (which order it is in).
    by_hash: HashMap<Hash, (VecDeque<PeerId>, bool)>,
    held_order: VecDeque<Hash>,
    relayed_order: VecDeque<Hash>,
    counters: HashMap<PeerId, PeerCounters>,
}

impl PeerBook {
    /// Remember addresses `peer` can be reached at (most recent first).
    pub(crate) fn add_addrs(&mut self, peer: PeerId, addrs: impl IntoIterator<Item = SocketAddr>) {
        if !self.addrs.contains_key(&peer) && self.addrs.len() >= MAX_PEERS {
            return;
        }
        let list = self.addrs.entry(peer).or_default();
        for a in addrs {
            if a.ip().is_unspecified() || a.port() == 0 {
                continue;
            }
            list.retain(|x| *x != a);
            list.insert(0, a);
        }
        list.truncate(MAX_ADDRS);
    }

    /// `peer` shut down: its addresses are forgotten, so peer exchange
    /// no longer sends others to them (until it says hello again). A
    /// short-lived `get` node is gone once its fetch is done, and its
    /// addresses took downloaders' dial slots for a timeout each.
    pub(crate) fn gone(&mut self, peer: &PeerId) {
        self.addrs.remove(peer);
    }

    pub(crate) fn addrs(&self, peer: &PeerId) -> Vec<SocketAddr> {
        self.addrs.get(peer).cloned().unwrap_or_default()
    }

    /// `peer` holds (or is fetching) `hash`; `held`: so does this node.
    pub(crate) fn saw(&mut self, hash: Hash, peer: PeerId, held: bool) {
        let was = self.by_hash.get(&hash).map(|(_, h)| *h);
        if was == Some(false) && held {
            // Now held: into the order a flood of made-up hashes cannot
            // reach.
            self.relayed_order.retain(|h| *h != hash);
        }
        if was.is_none() || (was == Some(false) && held) {
            let (order, cap) = if held {
                (&mut self.held_order, MAX_HASHES)
            } else {
                (&mut self.relayed_order, MAX_RELAYED)
            };
            if order.len() >= cap
                && let Some(old) = order.pop_front()
            {
                self.by_hash.remove(&old);
            }
            order.push_back(hash);
        }
        let (list, h) = self.by_hash.entry(hash).or_default();
        *h |= held;
        list.retain(|p| *p != peer);
        list.push_front(peer);
        list.truncate(MAX_PEERS_PER_HASH);
    }

    /// Peers seen with `hash`, with addresses, except `except`.
    pub(crate) fn peers_for(
        &self,
        hash: &Hash,
        except: &PeerId,
        max: usize,
    ) -> Vec<(PeerId, Vec<SocketAddr>)> {
        self.by_hash
            .get(hash)
            .into_iter()
            .flat_map(|(list, _)| list)
            .filter(|p| *p != except)
            .filter_map(|p| {
                let a = self.addrs(p);
                (!a.is_empty()).then_some((*p, a))
            })
            .take(max)
            .collect()
    }

    pub(crate) fn count_upload(&mut self, peer: PeerId, bytes: u64) {
        self.counter(peer).uploaded += bytes;
    }

    pub(crate) fn count_download(&mut self, peer: PeerId, bytes: u64) {
        self.counter(peer).downloaded += bytes;
    }

    /// `peer`'s counters; room is made for a new peer past [`MAX_PEERS`]
    /// by forgetting the one that moved fewest bytes (each new identity
    /// that fetched something took an entry for good).
    fn counter(&mut self, peer: PeerId) -> &mut PeerCounters {
        if !self.counters.contains_key(&peer)
            && self.counters.len() >= MAX_PEERS
            && let Some(least) = self
                .counters
                .iter()
                .min_by_key(|(_, c)| c.uploaded.saturating_add(c.downloaded))
                .map(|(p, _)| *p)
        {
            self.counters.remove(&least);
        }
        self.counters.entry(peer).or_default()
    }

    pub(crate) fn counters(&self) -> Vec<(PeerId, PeerCounters)> {
        self.counters.iter().map(|(p, c)| (*p, *c)).collect()
    }

    pub(crate) fn known(&self) -> Vec<PeerId> {
        self.addrs.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_transport::SecretKey;

    #[test]
    fn pex_lists_other_peers_with_addresses_and_stays_bounded() {
        let mut book = PeerBook::default();
        let hash = Hash::from_bytes([1; 32]);
        let me = SecretKey::generate().public();
        let other = SecretKey::generate().public();
        let nameless = SecretKey::generate().public();
        book.add_addrs(
            other,
            ["127.0.0.1:9".parse().unwrap(), "0.0.0.0:9".parse().unwrap()],
        );
        book.saw(hash, me, true);
        book.saw(hash, other, true);
        book.saw(hash, nameless, true);
        let peers = book.peers_for(&hash, &me, 10);
        // Only `other` has a dialable address; unspecified ones are dropped.
        assert_eq!(peers, vec![(other, vec!["127.0.0.1:9".parse().unwrap()])]);
        for i in 0..(MAX_HASHES + 10) {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&(i as u64).to_le_bytes());
            book.saw(Hash::from_bytes(h), other, i % 2 == 0);
        }
        assert!(book.by_hash.len() <= MAX_HASHES + MAX_RELAYED);
    }

    #[test]
    fn a_peer_gone_is_not_passed_on_until_it_says_hello_again() {
        let mut book = PeerBook::default();
        let hash = Hash::from_bytes([1; 32]);
        let me = SecretKey::generate().public();
        let left = SecretKey::generate().public();
        let stays = SecretKey::generate().public();
        book.add_addrs(left, ["127.0.0.1:9".parse().unwrap()]);
        book.add_addrs(stays, ["127.0.0.1:10".parse().unwrap()]);
        book.saw(hash, left, true);
        book.saw(hash, stays, true);
        book.gone(&left);
        let ids: Vec<PeerId> = book
            .peers_for(&hash, &me, 10)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(ids, vec![stays]);
        book.add_addrs(left, ["127.0.0.1:11".parse().unwrap()]);
        assert_eq!(book.peers_for(&hash, &me, 10).len(), 2);
    }

    #[test]
    fn byte_counters_stay_bounded_and_keep_the_busiest_peers() {
        let mut book = PeerBook::default();
        let busy = SecretKey::generate().public();
        book.count_upload(busy, 1 << 30);
        for i in 0..(MAX_PEERS + 100) {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i as u64).to_le_bytes());
            // Not all byte strings are keys: made-up ids from a hash.
            let id = SecretKey::from_bytes(blake3::hash(&b).as_bytes()).public();
            book.count_download(id, 1 + i as u64 % 7);
        }
        assert_eq!(book.counters.len(), MAX_PEERS);
        assert_eq!(book.counters[&busy].uploaded, 1 << 30);
    }

    #[test]
    fn made_up_hashes_push_out_only_hashes_this_node_has_none_of() {
        let mut book = PeerBook::default();
        let peer = SecretKey::generate().public();
        book.add_addrs(peer, ["127.0.0.1:9".parse().unwrap()]);
        let held = Hash::from_bytes([1; 32]);
        let relayed = Hash::from_bytes([2; 32]);
        let later_held = Hash::from_bytes([3; 32]);
        book.saw(held, peer, true);
        book.saw(relayed, peer, false);
        book.saw(later_held, peer, false);
        book.saw(later_held, peer, true);
        let other = SecretKey::generate().public();
        for i in 0..(2 * MAX_RELAYED as u64) {
            let mut h = [9u8; 32];
            h[..8].copy_from_slice(&i.to_le_bytes());
            book.saw(Hash::from_bytes(h), other, false);
        }
        assert_eq!(book.peers_for(&held, &other, 10).len(), 1);
        assert_eq!(book.peers_for(&later_held, &other, 10).len(), 1);
        assert!(book.peers_for(&relayed, &other, 10).is_empty());
        assert_eq!(book.relayed_order.len(), MAX_RELAYED);
        assert_eq!(book.by_hash.len(), MAX_RELAYED + 2);
    }
}
