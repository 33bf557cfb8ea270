//! This host's interface addresses, and expanding wildcard binds to them.

use std::net::{IpAddr, SocketAddr};

/// One address of one local interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LocalIp {
    pub(crate) interface: String,
    pub(crate) ip: IpAddr,
}

/// Every address of every interface of this host.
pub(crate) fn interfaces() -> std::io::Result<Vec<LocalIp>> {
    Ok(if_addrs::get_if_addrs()?
        .into_iter()
        .map(|i| LocalIp {
            ip: i.ip(),
            interface: i.name,
        })
        .collect())
}

/// The IPs to advertise now for a node bound to `binds`, and the one port
/// (the first bind's; an SRV record carries one port) they go with: the
/// addresses of `interfaces` that [`serves`] accepts.
pub(crate) fn expand(
    binds: &[SocketAddr],
    interfaces: &[LocalIp],
    only: &[String],
) -> (Vec<IpAddr>, u16) {
    let Some(port) = binds.first().map(SocketAddr::port) else {
        return (Vec::new(), 0);
    };
    let mut ips: Vec<IpAddr> = interfaces
        .iter()
        .filter(|l| serves(binds, only, &l.interface, l.ip))
        .map(|l| l.ip)
        .collect();
    ips.sort();
    ips.dedup();
    (ips, port)
}

/// Whether a node bound to `binds` is reached at `ip`, an address of
/// `interface`, on the first bind's port.
///
/// `0.0.0.0` stands for every IPv4 interface address; `[::]` for every IPv6
/// and IPv4 one (a Linux `[::]` socket is dual-stack unless `IPV6_V6ONLY`).
/// Binds on other ports than the first are left out. When `only` names
/// interfaces, addresses of other interfaces are left out too.
///
/// The mDNS registration asks this of every address the host has, now and
/// whenever one comes or goes, so a node bound to a wildcard advertises
/// the addresses it is reached at after a DHCP change too.
pub(crate) fn serves(binds: &[SocketAddr], only: &[String], interface: &str, ip: IpAddr) -> bool {
    let Some(port) = binds.first().map(SocketAddr::port) else {
        return false;
    };
    if !only.is_empty() && !only.iter().any(|o| o == interface) {
        return false;
    }
    binds
        .iter()
        .filter(|b| b.port() == port)
        .any(|b| match b.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => ip.is_ipv4(),
            IpAddr::V6(v6) if v6.is_unspecified() => true,
            bound => bound.to_canonical() == ip,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs() -> Vec<LocalIp> {
        [
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("eth0", "192.0.2.2"),
            ("eth0", "fd00::2"),
        ]
        .into_iter()
        .map(|(name, ip)| LocalIp {
            interface: name.to_owned(),
            ip: ip.parse().expect("ip"),
        })
        .collect()
    }

    fn check(binds: &[&str], only: &[&str], want: &[&str], want_port: u16) {
        let binds: Vec<SocketAddr> = binds.iter().map(|b| b.parse().expect("addr")).collect();
        let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
        let (ips, port) = expand(&binds, &ifs(), &only);
        let mut want: Vec<IpAddr> = want.iter().map(|w| w.parse().expect("ip")).collect();
        want.sort();
        assert_eq!(
            (ips, port),
            (want, want_port),
            "binds {binds:?} only {only:?}"
        );
    }

    #[test]
    fn expansion() {
        check(&["0.0.0.0:7000"], &[], &["127.0.0.1", "192.0.2.2"], 7000);
        check(
            &["[::]:7000"],
            &[],
            &["127.0.0.1", "192.0.2.2", "::1", "fd00::2"],
            7000,
        );
        check(&["0.0.0.0:7000"], &["lo"], &["127.0.0.1"], 7000);
        check(&["127.0.0.1:7000"], &[], &["127.0.0.1"], 7000);
        check(&["192.0.2.2:7000"], &["lo"], &[], 7000);
        check(
            &["0.0.0.0:7000", "[::1]:7000", "[fd00::2]:7001"],
            &[],
            &["127.0.0.1", "192.0.2.2", "::1"],
            7000,
        );
        check(&[], &[], &[], 0);
    }

    #[test]
    fn an_address_that_comes_later_is_served_by_a_wildcard_of_its_family() {
        let binds = |b: &[&str]| -> Vec<SocketAddr> {
            b.iter().map(|b| b.parse().expect("addr")).collect()
        };
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let v4 = binds(&["0.0.0.0:7000"]);
        assert!(serves(&v4, &[], "wlan0", ip("10.1.2.3")));
        assert!(
            !serves(&v4, &[], "wlan0", ip("fd00::3")),
            "v6 on a v4 socket"
        );
        let dual = binds(&["[::]:7000"]);
        assert!(serves(&dual, &[], "wlan0", ip("10.1.2.3")));
        assert!(serves(&dual, &[], "wlan0", ip("fd00::3")));
        let only = ["eth0".to_owned()];
        assert!(
            !serves(&dual, &only, "wlan0", ip("10.1.2.3")),
            "not an allowed interface"
        );
        let fixed = binds(&["192.0.2.2:7000", "0.0.0.0:7001"]);
        assert!(serves(&fixed, &[], "eth0", ip("192.0.2.2")));
        assert!(
            !serves(&fixed, &[], "eth0", ip("192.0.2.3")),
            "another port's wildcard"
        );
        let mapped = binds(&["[::ffff:192.0.2.2]:7000"]);
        assert!(serves(&mapped, &[], "eth0", ip("192.0.2.2")));
        assert!(!serves(&[], &[], "eth0", ip("192.0.2.2")));
    }
}
