//! Which addresses are ours, which candidates we already know, and when a
//! failing address may be dialled again. Pure: no sockets, no clock (the
//! caller passes `now`).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::{Candidate, PeerId};

/// The first wait after a failure.
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between two dials of a failing address.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5 * 60);

/// Tells whether a candidate is this node itself.
///
/// A listen address with an unspecified IP (`0.0.0.0:P`, `[::]:P`) matches
/// every loopback address and every local interface address with port `P`.
#[derive(Clone, Debug)]
pub struct SelfFilter {
    me: PeerId,
    /// Exact addresses we listen on.
    exact: Vec<SocketAddr>,
    /// Ports bound on an unspecified IP, and whether that IP is `[::]`
    /// (taken as dual-stack: it matches IPv4 addresses too).
    wildcard_ports: Vec<(u16, bool)>,
    /// This host's interface IPs, for the wildcard ports.
    local_ips: Vec<IpAddr>,
}

impl SelfFilter {
    /// A filter for the node `me`, listening on `listen` (as bound), on a host
    /// whose interfaces have `local_ips`.
    pub fn new(me: PeerId, listen: &[SocketAddr], local_ips: &[IpAddr]) -> SelfFilter {
        let mut exact = Vec::new();
        let mut wildcard_ports = Vec::new();
        for addr in listen {
            if addr.ip().is_unspecified() {
                wildcard_ports.push((addr.port(), addr.is_ipv6()));
            } else {
                exact.push(canonical(*addr));
            }
        }
        SelfFilter {
            me,
            exact,
            wildcard_ports,
            local_ips: local_ips.iter().map(|ip| ip.to_canonical()).collect(),
        }
    }

    /// This node's id.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// Whether `addr` reaches this node.
    pub fn is_own_addr(&self, addr: SocketAddr) -> bool {
        let addr = canonical(addr);
        if self.exact.contains(&addr) {
            return true;
        }
        let port_bound = self
            .wildcard_ports
            .iter()
            .any(|&(port, v6)| port == addr.port() && (v6 || addr.is_ipv4()));
        port_bound
            && (addr.ip().is_loopback()
                || addr.ip().is_unspecified()
                || self.local_ips.contains(&addr.ip()))
    }

    /// Whether `candidate` is this node, by id or by address.
    pub fn is_self(&self, candidate: &Candidate) -> bool {
        candidate.id == Some(self.me) || self.is_own_addr(candidate.addr)
    }
}

/// An address in the one spelling shoal compares and passes on:
/// `::ffff:a.b.c.d` and `a.b.c.d` are the same address (the IPv4 form is
/// kept); scope ids are not part of an address's identity here.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// How far an IP address reaches, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// This machine only: loopback.
    Host,
    /// One site's own network: RFC 1918, shared (carrier-grade NAT)
    /// 100.64.0.0/10, link-local (IPv4 and IPv6), IPv6 unique local
    /// `fc00::/7`.
    Site,
    /// Any other unicast address.
    Global,
}

/// The reach of `ip` (an IPv4-mapped IPv6 address as the IPv4 one).
pub fn scope(ip: IpAddr) -> Scope {
    match ip.to_canonical() {
        ip if ip.is_loopback() => Scope::Host,
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            let shared = a == 100 && (b & 0xc0) == 64;
            if v4.is_private() || v4.is_link_local() || shared {
                Scope::Site
            } else {
                Scope::Global
            }
        }
        // Unique local, and link-local: a peer met on its link-local
        // address is on this node's own network.
        IpAddr::V6(v6)
            if (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80 =>
        {
            Scope::Site
        }
        IpAddr::V6(_) => Scope::Global,
    }
}

/// Whether `addr`, told by a peer met at `via` (in its hello, or in its
/// answer to peer exchange), is worth dialling or passing on. A peer's
/// word only, so: no unspecified, multicast or broadcast address, no port
/// 0, no IPv6 link-local address (meaningless without the teller's
/// interface), and nothing narrower in reach than `via`. A peer met on a
/// public address that names a loopback or private one sends whoever
/// listens to something on their own machine or network (`127.0.0.1:53`,
/// a router's admin port) instead of to it; its peers on its own network
/// are found by mDNS. BitTorrent clients drop such peer-exchange entries
/// for the same reason.
pub fn plausible_from(addr: SocketAddr, via: SocketAddr) -> bool {
    plausible_within(addr, scope(via.ip()))
}

/// Whether `addr`, heard from a source whose answers may reach as
/// narrowly as `reach`, is worth dialling: as [`plausible_from`], with the
/// scope given. The DHT uses it: a public DHT stores each peer at the
/// address it announced from, so a loopback or private value in it is a
/// lie; a private DHT (bootstrapped on a private or loopback address)
/// holds its own network's addresses.
pub fn plausible_within(addr: SocketAddr, reach: Scope) -> bool {
    let ip = addr.ip().to_canonical();
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    let v6_link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
    addr.port() != 0
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && !broadcast
        && !v6_link_local
        && scope(ip) >= reach
}

#[derive(Clone, Debug)]
struct Entry {
    candidate: Candidate,
    failures: u32,
    retry_at: Option<Instant>,
}

/// The candidates a node knows, de-duplicated by address, without itself,
/// with exponential backoff for addresses that keep failing.
///
/// Backoff: after `n` consecutive failures an address may be dialled again
/// `min(1 s * 2^(n-1), 5 min)` after the last failure; a success resets it.
#[derive(Clone, Debug)]
pub struct AddressBook {
    self_filter: SelfFilter,
    /// Addresses found to be this node (a candidate with our id, or
    /// [`AddressBook::record_self`]).
    own: HashSet<SocketAddr>,
    entries: HashMap<SocketAddr, Entry>,
}

impl AddressBook {
    /// An empty book for the node described by `self_filter`.
    pub fn new(self_filter: SelfFilter) -> AddressBook {
        AddressBook {
            self_filter,
            own: HashSet::new(),
            entries: HashMap::new(),
        }
    }

    /// Whether `addr` is this node: a listen address, or one learnt to be ours.
    pub fn is_self_addr(&self, addr: SocketAddr) -> bool {
        self.self_filter.is_own_addr(addr) || self.own.contains(&canonical(addr))
    }

    /// `addr` turned out to reach this node (say, a dial answered with our
    /// own id): never return or dial it again.
    pub fn record_self(&mut self, addr: SocketAddr) {
        let key = canonical(addr);
        self.entries.remove(&key);
        self.own.insert(key);
    }

    /// Adds a candidate. Returns `false` when it is this node, or when its
    /// address is already known (a known address without an id learns the
    /// candidate's id, if it has one).
    pub fn insert(&mut self, candidate: Candidate) -> bool {
        if candidate.id == Some(self.self_filter.me()) {
            self.record_self(candidate.addr);
            return false;
        }
        if self.is_self_addr(candidate.addr) {
            return false;
        }
        let key = canonical(candidate.addr);
        match self.entries.get_mut(&key) {
            Some(entry) => {
                if entry.candidate.id.is_none() && candidate.id.is_some() {
                    entry.candidate.id = candidate.id;
                }
                false
            }
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        candidate,
                        failures: 0,
                        retry_at: None,
                    },
                );
                true
            }
        }
    }

    /// Forgets `addr`.
    pub fn remove(&mut self, addr: SocketAddr) -> Option<Candidate> {
        self.entries
            .remove(&canonical(addr))
            .map(|entry| entry.candidate)
    }

    /// A dial to `addr` worked: forget its failures.
    pub fn record_success(&mut self, addr: SocketAddr) {
        if let Some(entry) = self.entries.get_mut(&canonical(addr)) {
            entry.failures = 0;
            entry.retry_at = None;
        }
    }

    /// A dial to `addr` failed at `now`: wait longer before the next one.
    /// An address not in the book is added (as a [`Source::Static`](crate::Source::Static)
    /// candidate without id) so that its backoff is remembered.
    pub fn record_failure(&mut self, addr: SocketAddr, now: Instant) {
        if self.is_self_addr(addr) {
            return;
        }
        let entry = self
            .entries
            .entry(canonical(addr))
            .or_insert_with(|| Entry {
                candidate: Candidate {
                    addr,
                    id: None,
                    source: crate::Source::Static,
                },
                failures: 0,
                retry_at: None,
            });
        entry.failures = entry.failures.saturating_add(1);
        entry.retry_at = Some(now + backoff(entry.failures));
    }

    /// Whether `addr` may be dialled at `now`: not ourselves, and not waiting
    /// out a backoff. Unknown addresses may be dialled.
    pub fn should_dial(&self, addr: SocketAddr, now: Instant) -> bool {
        if self.is_self_addr(addr) {
            return false;
        }
        match self.entries.get(&canonical(addr)) {
            Some(Entry {
                retry_at: Some(at), ..
            }) => now >= *at,
            _ => true,
        }
    }

    /// When `addr` may be dialled again, if it is backing off.
    pub fn retry_at(&self, addr: SocketAddr) -> Option<Instant> {
        self.entries.get(&canonical(addr))?.retry_at
    }

    /// Consecutive failures recorded for `addr`.
    pub fn failures(&self, addr: SocketAddr) -> u32 {
        self.entries
            .get(&canonical(addr))
            .map_or(0, |entry| entry.failures)
    }

    /// The known candidate at `addr`.
    pub fn get(&self, addr: SocketAddr) -> Option<&Candidate> {
        self.entries
            .get(&canonical(addr))
            .map(|entry| &entry.candidate)
    }

    /// Every candidate that may be dialled at `now`.
    pub fn dialable(&self, now: Instant) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = self
            .entries
            .values()
            .filter(|entry| entry.retry_at.is_none_or(|at| now >= at))
            .map(|entry| entry.candidate.clone())
            .collect();
        out.sort_by_key(|c| c.addr);
        out
    }

    /// How many addresses the book holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the book is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The filter this book uses to drop this node itself.
    pub fn self_filter(&self) -> &SelfFilter {
        &self.self_filter
    }
}

/// The wait after `failures` consecutive failures (`failures >= 1`).
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(20);
    BACKOFF_MIN.saturating_mul(1u32 << shift).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Source;

    use shoal_transport::SecretKey;

    fn me() -> PeerId {
        SecretKey::from_bytes(&[1; 32]).public()
    }
    fn other() -> PeerId {
        SecretKey::from_bytes(&[2; 32]).public()
    }
    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn scopes_of_addresses() {
        let sc = |s: &str| scope(s.parse().unwrap());
        for ip in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(sc(ip), Scope::Host, "{ip}");
        }
        for ip in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.0.9",
            "100.64.0.1",
            "100.127.255.255",
            "fd00::1",
            "fc12::1",
            "fe80::1",
            "::ffff:192.168.0.1",
        ] {
            assert_eq!(sc(ip), Scope::Site, "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "100.63.255.255",
            "203.0.113.7",
            "2001:db8::1",
            "::ffff:198.51.100.1",
        ] {
            assert_eq!(sc(ip), Scope::Global, "{ip}");
        }
    }

    #[test]
    fn a_peers_word_is_plausible_only_as_far_as_it_reaches() {
        let public = addr("203.0.113.7:4000");
        let private = addr("10.0.0.5:4000");
        let local = addr("127.0.0.1:4000");
        // Never: whoever tells it.
        for bad in [
            "0.0.0.0:4000",
            "[::]:4000",
            "224.0.0.251:5353",
            "[ff02::fb]:5353",
            "255.255.255.255:4000",
            "198.51.100.1:0",
            "[fe80::1]:4000",
        ] {
            for via in [public, private, local] {
                assert!(!plausible_from(addr(bad), via), "{bad} via {via}");
            }
        }
        // A public peer's public addresses only.
        assert!(plausible_from(addr("198.51.100.1:4000"), public));
        assert!(plausible_from(addr("[2001:db8::1]:4000"), public));
        for narrow in [
            "10.0.0.6:4000",
            "192.168.1.1:80",
            "[fd00::1]:4000",
            "127.0.0.1:53",
            "[::1]:4000",
        ] {
            assert!(!plausible_from(addr(narrow), public), "{narrow}");
        }
        // A peer on a private network: its network's and public ones.
        assert!(plausible_from(addr("10.0.0.6:4000"), private));
        assert!(plausible_from(addr("198.51.100.1:4000"), private));
        assert!(!plausible_from(addr("127.0.0.1:53"), private));
        // A peer on this machine: anything a host may have.
        for ok in [
            "127.0.0.1:4001",
            "[::1]:4001",
            "10.0.0.6:4000",
            "198.51.100.1:4000",
        ] {
            assert!(plausible_from(addr(ok), local), "{ok}");
        }
        // Met on an IPv6 link-local address: on this network.
        let link = addr("[fe80::2]:4000");
        assert!(plausible_from(addr("192.168.1.7:4000"), link));
        assert!(plausible_from(addr("[fd00::7]:4000"), link));
        assert!(!plausible_from(addr("[fe80::7]:4000"), link));
        // Met through a dual-stack socket: as the IPv4 address it is.
        assert!(!plausible_from(private, addr("[::ffff:203.0.113.7]:4000")));
        assert!(plausible_from(private, addr("[::ffff:10.0.0.1]:4000")));
    }
    fn cand(a: &str, id: Option<PeerId>, source: Source) -> Candidate {
        Candidate {
            addr: addr(a),
            id,
            source,
        }
    }
    fn book() -> AddressBook {
        AddressBook::new(SelfFilter::new(
            me(),
            &[addr("0.0.0.0:7000"), addr("[fd00::2]:7001")],
            &[
                "192.0.2.2".parse().expect("ip"),
                "fd00::2".parse().expect("ip"),
            ],
        ))
    }

    #[test]
    fn backoff_table() {
        let s = Duration::from_secs;
        for (failures, want) in [
            (1, s(1)),
            (2, s(2)),
            (3, s(4)),
            (9, s(256)),
            (10, s(300)),
            (30, s(300)),
            (u32::MAX, s(300)),
        ] {
            assert_eq!(backoff(failures), want, "after {failures} failures");
        }
    }

    #[test]
    fn backoff_grows_and_resets() {
        let mut book = book();
        let peer = addr("10.1.1.1:9000");
        let t0 = Instant::now();
        assert!(book.should_dial(peer, t0));

        book.record_failure(peer, t0);
        assert!(!book.should_dial(peer, t0));
        assert!(book.should_dial(peer, t0 + Duration::from_secs(1)));

        let t1 = t0 + Duration::from_secs(1);
        book.record_failure(peer, t1);
        assert!(!book.should_dial(peer, t1 + Duration::from_millis(1999)));
        assert!(book.should_dial(peer, t1 + Duration::from_secs(2)));

        let mut t = t1;
        for _ in 0..20 {
            book.record_failure(peer, t);
            t += Duration::from_secs(1);
        }
        assert_eq!(book.failures(peer), 22);
        let last = t - Duration::from_secs(1);
        assert_eq!(book.retry_at(peer), Some(last + BACKOFF_MAX));
        assert!(!book.should_dial(peer, last + BACKOFF_MAX - Duration::from_millis(1)));
        assert!(book.dialable(last).is_empty());

        book.record_success(peer);
        assert_eq!(book.failures(peer), 0);
        assert!(book.should_dial(peer, last));
        assert_eq!(book.dialable(last).len(), 1);

        // After a reset the backoff starts again from the minimum.
        book.record_failure(peer, last);
        assert_eq!(book.retry_at(peer), Some(last + BACKOFF_MIN));
    }

    #[test]
    fn self_is_never_returned() {
        let mut book = book();
        let now = Instant::now();
        for (c, why) in [
            (cand("10.9.9.9:1", Some(me()), Source::Mdns), "our id"),
            (
                cand("127.0.0.1:7000", None, Source::Dht),
                "loopback on a wildcard port",
            ),
            (
                cand("192.0.2.2:7000", None, Source::Dht),
                "interface ip on a wildcard port",
            ),
            (
                cand("[::ffff:192.0.2.2]:7000", None, Source::Pex),
                "mapped v4",
            ),
            (
                cand("[fd00::2]:7001", None, Source::Static),
                "exact listen address",
            ),
        ] {
            assert!(!book.insert(c.clone()), "{why}: inserted");
            assert!(!book.should_dial(c.addr, now), "{why}: dialable");
        }
        book.record_failure(addr("127.0.0.1:7000"), now);
        assert!(book.is_empty());
        // An address learnt to be ours is dropped whatever the source says.
        assert!(!book.insert(cand("10.9.9.9:1", None, Source::Dht)));
        assert!(book.insert(cand("10.9.9.8:1", None, Source::Dht)));
        book.record_self(addr("10.9.9.8:1"));
        assert!(book.is_empty());
        assert!(!book.should_dial(addr("10.9.9.8:1"), now));
        assert!(book.dialable(now).is_empty());

        // Same IPs on other ports are other nodes.
        assert!(book.insert(cand("127.0.0.1:7001", None, Source::Dht)));
        assert!(book.insert(cand("[fd00::2]:7000", None, Source::Dht)));
        assert_eq!(book.len(), 2);
    }

    #[test]
    fn dedupe_by_address_and_learn_ids() {
        let mut book = book();
        assert!(book.insert(cand("10.0.0.5:9000", None, Source::Dht)));
        assert!(!book.insert(cand("10.0.0.5:9000", None, Source::Pex)));
        assert!(!book.insert(cand("[::ffff:10.0.0.5]:9000", None, Source::Static)));
        assert!(!book.insert(cand("10.0.0.5:9000", Some(other()), Source::Mdns)));
        assert_eq!(book.len(), 1);
        let known = book.get(addr("10.0.0.5:9000")).expect("known");
        assert_eq!(known.id, Some(other()));
        assert_eq!(known.source, Source::Dht);
        assert!(book.insert(cand("10.0.0.5:9001", Some(other()), Source::Mdns)));
        assert_eq!(book.dialable(Instant::now()).len(), 2);
        assert!(book.remove(addr("10.0.0.5:9000")).is_some());
        assert_eq!(book.len(), 1);
    }
}
