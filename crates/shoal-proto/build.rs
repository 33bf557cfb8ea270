//! Compiles `proto/shoal/v1/*.proto` with `protox` (pure Rust, no `protoc`
//! needed) and turns the descriptors into Rust with `prost-build`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "peer.proto",
        "collection.proto",
        "ticket.proto",
        "control.proto",
    ]
    .map(|f| root.join("shoal/v1").join(f));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
