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

/// The IPs to advertise for a node bound to `binds`, and the one port (the
/// first bind's; an SRV record carries one port) they go with.
///
/// `0.0.0.0` stands for every IPv4 interface address; `[::]` for every IPv6
/// and IPv4 one (a Linux `[::]` socket is dual-stack unless `IPV6_V6ONLY`).
/// Binds on other ports than the first are left out. When `only` names
/// interfaces, addresses of other interfaces are left out too.
pub(crate) fn expand(
    binds: &[SocketAddr],
    interfaces: &[LocalIp],
    only: &[String],
) -> (Vec<IpAddr>, u16) {
    let Some(port) = binds.first().map(SocketAddr::port) else {
        return (Vec::new(), 0);
    };
    let allowed = |l: &&LocalIp| only.is_empty() || only.contains(&l.interface);
    let mut ips = Vec::new();
    for bind in binds.iter().filter(|b| b.port() == port) {
        match bind.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => ips.extend(
                interfaces
                    .iter()
                    .filter(allowed)
                    .filter(|l| l.ip.is_ipv4())
                    .map(|l| l.ip),
            ),
            IpAddr::V6(v6) if v6.is_unspecified() => {
                ips.extend(interfaces.iter().filter(allowed).map(|l| l.ip));
            }
            ip => {
                let ip = ip.to_canonical();
                let on_allowed = only.is_empty()
                    || interfaces
                        .iter()
                        .any(|l| l.ip == ip && only.contains(&l.interface));
                if on_allowed {
                    ips.push(ip);
                }
            }
        }
    }
    ips.sort();
    ips.dedup();
    (ips, port)
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
}
