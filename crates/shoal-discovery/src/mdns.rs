//! The LAN source: register this node and browse for others with mDNS.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mdns_sd::{
    IfKind, IfPredicate, ResolvedService, ScopedIp, ServiceDaemon, ServiceEvent, ServiceInfo,
};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::local::{self, LocalIp};
use crate::{
    Candidate, DiscoveryConfig, DiscoveryError, MDNS_SERVICE_TYPE, PROTOCOL_VERSION, PeerId, Source,
};

pub(crate) type Neighbours = Arc<Mutex<HashMap<PeerId, Vec<Candidate>>>>;

/// Services remembered from the LAN: anyone on it can announce names by
/// the thousand; past this many, new ones are ignored until some leave.
const MAX_NEIGHBOURS: usize = 1024;
/// Addresses taken from one announcement.
const MAX_ADDRS_PER_NEIGHBOUR: usize = 16;

/// The running mDNS daemon and our registration in it.
pub(crate) struct MdnsService {
    daemon: ServiceDaemon,
    fullname: Option<String>,
}

impl MdnsService {
    /// Starts the daemon on the configured interfaces, registers `me` for
    /// a node bound to `binds` (this host's addresses now: `now`), and
    /// spawns the browse task.
    pub(crate) fn start(
        me: PeerId,
        binds: &[SocketAddr],
        now: &[LocalIp],
        config: &DiscoveryConfig,
        neighbours: Neighbours,
        events: broadcast::Sender<Candidate>,
        cancel: CancellationToken,
    ) -> Result<(MdnsService, JoinHandle<()>), DiscoveryError> {
        let daemon = ServiceDaemon::new_with_port(config.mdns_port)?;
        let setup = register(&daemon, me, binds, now, config)
            .and_then(|fullname| Ok((fullname, daemon.browse(MDNS_SERVICE_TYPE)?)));
        let (fullname, browse) = match setup {
            Ok(done) => done,
            Err(err) => {
                let _ = daemon.shutdown();
                return Err(err.into());
            }
        };
        let task = tokio::spawn(browse_loop(me, browse, neighbours, events, cancel));
        Ok((MdnsService { daemon, fullname }, task))
    }

    /// Unregisters (waiting up to a second for the goodbye packets) and stops
    /// the daemon.
    pub(crate) async fn shutdown(self) {
        if let Some(fullname) = &self.fullname {
            match self.daemon.unregister(fullname) {
                Ok(status) => {
                    let waited =
                        tokio::time::timeout(Duration::from_secs(1), status.recv_async()).await;
                    if waited.is_err() {
                        tracing::debug!("mdns: unregister did not finish within 1 s");
                    }
                }
                Err(err) => tracing::debug!(%err, "mdns: unregister failed"),
            }
        }
        self.shutdown_now();
    }

    /// Stops the daemon without waiting (it still says goodbye for our
    /// registration on its way out).
    pub(crate) fn shutdown_now(self) {
        if let Err(err) = self.daemon.shutdown() {
            tracing::debug!(%err, "mdns: daemon shutdown failed");
        }
    }
}

/// Restricts the daemon to the configured interfaces and registers `me`
/// for a node bound to `binds`, whose addresses the daemon keeps current
/// (see [`local::serves`]). Returns the registered full name, or `None`
/// when no address of this host can ever be advertised.
fn register(
    daemon: &ServiceDaemon,
    me: PeerId,
    binds: &[SocketAddr],
    now: &[LocalIp],
    config: &DiscoveryConfig,
) -> Result<Option<String>, mdns_sd::Error> {
    if !config.mdns_interfaces.is_empty() {
        daemon.disable_interface(IfKind::All)?;
        let names: Vec<IfKind> = config
            .mdns_interfaces
            .iter()
            .map(|name| IfKind::Name(name.clone()))
            .collect();
        daemon.enable_interface(names)?;
    }
    let (ips, port) = local::expand(binds, now, &config.mdns_interfaces);
    let wildcard = binds.iter().any(|b| b.ip().is_unspecified());
    if ips.is_empty() {
        if !wildcard {
            // A bound address exists, so it can only be on an interface
            // left out by `mdns_interfaces`: it never will be advertised.
            tracing::warn!(
                "mdns: no interface address to advertise; browsing only, this node stays unseen on the lan"
            );
            return Ok(None);
        }
        tracing::info!(
            "mdns: no interface address yet; this node is advertised once an interface has one"
        );
    }
    let id = me.to_string();
    let properties = [("id", id.as_str()), ("v", PROTOCOL_VERSION)];
    let host = format!("{id}.local.");
    // The daemon fills in the addresses (those `serves` accepts) and
    // updates them as interfaces come and go: a node started before the
    // network was up, or whose address changed, is still found.
    let mut info = ServiceInfo::new(
        MDNS_SERVICE_TYPE,
        &id,
        &host,
        &[] as &[IpAddr],
        port,
        &properties[..],
    )?
    .enable_addr_auto();
    let (binds, only) = (binds.to_vec(), config.mdns_interfaces.clone());
    info.set_interfaces(vec![IfKind::Predicate(IfPredicate::new(move |intf| {
        local::serves(&binds, &only, &intf.name, intf.ip())
    }))]);
    let fullname = info.get_fullname().to_owned();
    daemon.register(info)?;
    tracing::debug!(%fullname, ?ips, port, "mdns: registered");
    Ok(Some(fullname))
}

async fn browse_loop(
    me: PeerId,
    browse: mdns_sd::Receiver<ServiceEvent>,
    neighbours: Neighbours,
    events: broadcast::Sender<Candidate>,
    cancel: CancellationToken,
) {
    // Instance full name -> peer id, to handle removals.
    let mut names: HashMap<String, PeerId> = HashMap::new();
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => return,
            event = browse.recv_async() => event,
        };
        let Ok(event) = event else {
            tracing::debug!("mdns: browse channel closed");
            return;
        };
        match event {
            ServiceEvent::ServiceResolved(service) => {
                let Some((id, candidates)) = parse_resolved(&service) else {
                    continue;
                };
                if id == me {
                    continue;
                }
                let fullname = service.get_fullname();
                if !names.contains_key(fullname) && names.len() >= MAX_NEIGHBOURS {
                    tracing::debug!(
                        name = fullname,
                        "mdns: {MAX_NEIGHBOURS} neighbours known already, ignored"
                    );
                    continue;
                }
                // A name announced again with another id: the old id goes,
                // unless another name still announces it (else one name
                // re-announced with fresh ids grew the map without bound).
                if let Some(old) = names.insert(fullname.to_owned(), id)
                    && old != id
                    && !names.values().any(|other| *other == old)
                {
                    neighbours
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&old);
                }
                let new: Vec<Candidate> = {
                    let mut map = neighbours.lock().unwrap_or_else(PoisonError::into_inner);
                    let known = map.entry(id).or_default();
                    let new = candidates
                        .iter()
                        .filter(|c| !known.contains(c))
                        .cloned()
                        .collect();
                    *known = candidates;
                    new
                };
                if !new.is_empty() {
                    tracing::debug!(peer = %id, addrs = ?new.iter().map(|c| c.addr).collect::<Vec<_>>(), "mdns: neighbour");
                }
                for candidate in new {
                    // No receiver (no find running) is fine.
                    let _ = events.send(candidate);
                }
            }
            ServiceEvent::ServiceRemoved(_, fullname) => {
                if let Some(id) = names.remove(&fullname) {
                    tracing::debug!(peer = %id, "mdns: neighbour left");
                    // Another name may still announce the same id.
                    if !names.values().any(|other| *other == id) {
                        neighbours
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&id);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The peer id and dialable addresses of a resolved shoal service, or `None`
/// when it is not one we can use (wrong version, bad id).
fn parse_resolved(service: &ResolvedService) -> Option<(PeerId, Vec<Candidate>)> {
    let version = service.get_property_val_str("v");
    if version != Some(PROTOCOL_VERSION) {
        tracing::debug!(
            name = service.get_fullname(),
            ?version,
            "mdns: other protocol version, ignored"
        );
        return None;
    }
    let id: PeerId = match service.get_property_val_str("id").map(str::parse) {
        Some(Ok(id)) => id,
        _ => {
            tracing::debug!(
                name = service.get_fullname(),
                "mdns: no valid id in txt, ignored"
            );
            return None;
        }
    };
    let port = service.get_port();
    let mut candidates: Vec<Candidate> = service
        .get_addresses()
        .iter()
        .map(|ip| {
            let addr = match ip {
                ScopedIp::V4(v4) => SocketAddr::V4(SocketAddrV4::new(*v4.addr(), port)),
                ScopedIp::V6(v6) => {
                    let scope = if v6.addr().is_unicast_link_local() {
                        v6.scope_id().index
                    } else {
                        0
                    };
                    SocketAddr::V6(SocketAddrV6::new(*v6.addr(), port, 0, scope))
                }
                other => SocketAddr::new(other.to_ip_addr(), port),
            };
            Candidate {
                addr,
                id: Some(id),
                source: Source::Mdns,
            }
        })
        .collect();
    candidates.sort_by_key(|c| c.addr);
    candidates.dedup();
    candidates.truncate(MAX_ADDRS_PER_NEIGHBOUR);
    Some((id, candidates))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;
    use shoal_transport::SecretKey;

    fn announce(id: PeerId, name: &str, port: u16) -> ServiceEvent {
        let props = [("v", PROTOCOL_VERSION), ("id", &id.to_string())];
        let info = ServiceInfo::new(
            MDNS_SERVICE_TYPE,
            name,
            "host.local.",
            "192.0.2.1",
            port,
            &props[..],
        )
        .unwrap();
        ServiceEvent::ServiceResolved(Box::new(info.as_resolved_service()))
    }

    #[tokio::test]
    async fn lan_announcements_past_the_cap_are_ignored() {
        let (tx, rx) = flume::unbounded();
        let neighbours = Neighbours::default();
        let (events, mut seen) = broadcast::channel(8192);
        let cancel = CancellationToken::new();
        let me = SecretKey::generate().public();
        let task = tokio::spawn(browse_loop(
            me,
            rx,
            neighbours.clone(),
            events,
            cancel.clone(),
        ));
        let n = MAX_NEIGHBOURS + 500;
        for i in 0..n {
            let id = SecretKey::generate().public();
            tx.send(announce(id, &format!("n{i}"), 1000 + i as u16))
                .unwrap();
        }
        // One name announced again and again, with a fresh id each time:
        // it stays one neighbour.
        for _ in 0..100 {
            let id = SecretKey::generate().public();
            tx.send(announce(id, "n0", 1000)).unwrap();
        }
        drop(tx);
        task.await.unwrap();
        assert_eq!(neighbours.lock().unwrap().len(), MAX_NEIGHBOURS);
        let mut told = 0;
        while seen.try_recv().is_ok() {
            told += 1;
        }
        assert_eq!(told, MAX_NEIGHBOURS + 100);
    }
}
