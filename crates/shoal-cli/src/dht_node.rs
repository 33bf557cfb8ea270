//! `shoal dht-node`: a bare Mainline DHT node in server mode, to bootstrap a
//! private DHT (a lab, a LAN without internet, the namespace tests) that
//! shoal nodes then join with `--dht-bootstrap`. It stores and answers
//! announces like any DHT node; it holds no content and speaks no shoal.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::output::Out;

#[derive(Args, Debug)]
pub(crate) struct DhtNodeArgs {
    /// The UDP address to bind (IPv4; port 0 picks one).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:6881")]
    listen: SocketAddr,
    /// DHT nodes to join; without any, this node starts a new, private DHT
    /// that others bootstrap from.
    #[arg(long = "dht-bootstrap", value_name = "ADDR")]
    dht_bootstrap: Vec<SocketAddr>,
}

/// Runs the node until SIGINT/SIGTERM; prints `ready <addr>` once bound.
pub(crate) async fn run(args: &DhtNodeArgs, out: &Out) -> Result<()> {
    let IpAddr::V4(ip) = args.listen.ip() else {
        bail!(
            "--listen {}: the Mainline DHT library speaks IPv4 only; give an IPv4 address",
            args.listen
        );
    };
    let (port, bootstrap) = (args.listen.port(), args.dht_bootstrap.clone());
    let dht = tokio::task::spawn_blocking(move || {
        let mut builder = mainline::Dht::builder();
        builder.server_mode().bind_address(ip);
        builder.port(port);
        if bootstrap.is_empty() {
            builder.no_bootstrap();
        } else {
            builder.bootstrap(&bootstrap);
        }
        builder.build()
    })
    .await
    .context("starting the dht node")?
    .with_context(|| format!("binding the dht node to {}", args.listen))?
    .as_async();
    let addr = dht.info().await.local_addr();
    out.dht_ready(&SocketAddr::from(addr))?;
    if !args.dht_bootstrap.is_empty() && !dht.bootstrapped().await {
        tracing::warn!(bootstrap = ?args.dht_bootstrap, "no dht bootstrap node answered; waiting for others to join this node");
    }
    crate::wait_for_signal().await?;
    note!("shutting down");
    Ok(())
}
