//! Embedding shoal in another program: two nodes in one process, one adds
//! bytes, the other fetches them by ticket and checks what it got.
//!
//! Run with `cargo run -p shoal-node --example embed`.

use shoal_node::{FetchOutput, FetchRequest, Node, NodeConfig, NodeError};

#[tokio::main]
async fn main() -> Result<(), NodeError> {
    // In-memory stores and fresh identities, listening on loopback only.
    let config = || NodeConfig {
        listen: vec!["127.0.0.1:0".parse().expect("address")],
        ..NodeConfig::default()
    };
    let seeder = Node::spawn(config()).await?;
    let fetcher = Node::spawn(config()).await?;

    // Add some bytes; the hash is their BLAKE3 hash.
    let data = b"hello from an embedded shoal node\n".repeat(10_000);
    let hash = seeder.add_bytes(data.clone(), "hello.txt").await?;
    assert_eq!(hash, blake3::hash(&data));

    // A ticket carries the hash and how to reach the seeder.
    let ticket = seeder.ticket(&hash)?;
    println!("seeder {} offers {hash}", seeder.peer_id());
    println!("ticket: {ticket}");

    // Fetch into the second node's store, verified group by group.
    let report = fetcher
        .fetch(FetchRequest::from_ticket(&ticket, FetchOutput::Store), None)
        .await?;
    let mut copy = Vec::new();
    fetcher.store().export_blob(&hash, &mut copy)?;
    assert_eq!(copy, data, "fetched bytes differ");
    println!("fetched {} bytes in {:?}", report.bytes, report.elapsed);

    fetcher.shutdown().await;
    seeder.shutdown().await;
    Ok(())
}
