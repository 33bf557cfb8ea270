//! What goes to stdout: results only, as text or JSON lines; and the
//! progress bar on stderr when it is a terminal.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use shoal_node::{FetchReport, Hash, Node, Progress};
use shoal_proto::pb;
use shoal_store::BlobKind;

pub(crate) struct Out {
    pub(crate) json: bool,
}

pub(crate) fn line(s: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{s}")
        .and_then(|()| o.flush())
        .context("writing to stdout")
}

pub(crate) fn kind_name(k: i32) -> &'static str {
    if k == pb::BlobKind::Collection as i32 {
        "collection"
    } else {
        "blob"
    }
}

pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn hex(b: &[u8]) -> String {
    shoal_proto::hash_from_bytes(b)
        .map(|h| Hash::from_bytes(h).to_hex().to_string())
        .unwrap_or_else(|_| "?".into())
}

impl Out {
    pub(crate) fn new(json: bool) -> Self {
        Out { json }
    }

    pub(crate) fn id(&self, id: &str) -> Result<()> {
        if self.json {
            line(&json!({ "peer_id": id }).to_string())
        } else {
            line(id)
        }
    }

    /// Exactly like `b3sum`: `<hash>  <path>`.
    pub(crate) fn added(&self, hash: &Hash, path: &Path, collection: bool) -> Result<()> {
        if self.json {
            line(&json!({ "hash": hash.to_hex().as_str(), "path": path.to_string_lossy(), "kind": if collection { "collection" } else { "blob" } }).to_string())
        } else {
            line(&b3sum_line(hash, path))
        }
    }

    pub(crate) fn list(&self, items: &[pb::StoreItem]) -> Result<()> {
        if self.json {
            for i in items {
                // A collection is complete when its files are, as the
                // table says (its manifest alone said `true` at 21%).
                let complete = if i.files > 0 {
                    i.content_verified >= i.content_size
                } else {
                    i.complete
                };
                let mut v = json!({
                    "hash": hex(&i.hash), "size": i.size, "complete": complete, "verified": i.verified,
                    "kind": kind_name(i.kind), "name": i.name, "pinned": i.pinned,
                    "corrupt": i.corrupt, "changed": i.changed,
                });
                if i.files > 0 {
                    v["content_size"] = json!(i.content_size);
                    v["content_verified"] = json!(i.content_verified);
                    v["files"] = json!(i.files);
                }
                line(&v.to_string())?;
            }
            return Ok(());
        }
        if items.is_empty() {
            note!("the store is empty");
            return Ok(());
        }
        line(&format!(
            "{:<64}  {:>10}  {:<9}  {:<10}  NAME",
            "HASH", "SIZE", "STATE", "KIND"
        ))?;
        for i in items {
            // A collection whose manifest is here: what it names, the
            // bytes a user thinks of (its manifest is a few hundred).
            let (size, verified, complete) = if i.files > 0 {
                let whole = i.content_verified >= i.content_size;
                (i.content_size, i.content_verified, whole)
            } else {
                (i.size, i.verified, i.complete)
            };
            // Not served, whatever it holds: say so first.
            let state = if i.corrupt {
                "corrupt".to_string()
            } else if i.changed {
                "changed".to_string()
            } else if complete {
                "complete".to_string()
            } else {
                format!("{}%", percent(verified, size))
            };
            let pin = if i.pinned { "" } else { " (unpinned)" };
            line(&format!(
                "{:<64}  {:>10}  {:<9}  {:<10}  {}{pin}",
                hex(&i.hash),
                human(size),
                state,
                kind_name(i.kind),
                shown(&i.name)
            ))?;
        }
        let unserved = items.iter().filter(|i| i.corrupt || i.changed).count();
        if unserved > 0 {
            note!(
                "{unserved} blob(s) not served: `shoal verify HASH` re-hashes one (a file in place that was \
                 only touched is served again; a running node does that by itself when a peer asks for \
                 it); `shoal add PATH` shares a file's new content"
            );
        }
        Ok(())
    }

    pub(crate) fn gc(&self, blobs: u64, bytes: u64) -> Result<()> {
        if self.json {
            line(&json!({ "blobs": blobs, "bytes": bytes }).to_string())
        } else {
            line(&format!(
                "freed {blobs} blob{}, {}",
                if blobs == 1 { "" } else { "s" },
                human(bytes)
            ))
        }
    }

    pub(crate) fn verified(&self, hash: &Hash, ok: bool) -> Result<()> {
        let word = if ok { "ok" } else { "corrupt" };
        if self.json {
            line(&json!({ "hash": hash.to_hex().as_str(), "status": word }).to_string())
        } else {
            line(&format!("{}  {word}", hash.to_hex()))
        }
    }

    pub(crate) fn ready(&self, node: &Node) -> Result<()> {
        let addrs: Vec<String> = node.addrs().iter().map(|a| a.to_string()).collect();
        if self.json {
            line(
                &json!({ "ready": true, "peer_id": node.peer_id().to_string(), "addrs": addrs })
                    .to_string(),
            )
        } else {
            line(&format!("ready {} {}", node.peer_id(), addrs.join(" ")))
        }
    }

    /// `ready <addr>` of `shoal dht-node`.
    pub(crate) fn dht_ready(&self, addr: &std::net::SocketAddr) -> Result<()> {
        if self.json {
            line(&json!({ "ready": true, "addr": addr.to_string() }).to_string())
        } else {
            line(&format!("ready {addr}"))
        }
    }

    pub(crate) fn ticket(&self, t: &str) -> Result<()> {
        if self.json {
            line(&json!({ "ticket": t }).to_string())
        } else {
            line(t)
        }
    }

    pub(crate) fn peers(&self, peers: &[pb::PeerStatus]) -> Result<()> {
        if self.json {
            for p in peers {
                line(
                    &json!({ "peer_id": p.peer_id, "addrs": p.addrs, "connected": p.connected, "uploaded": p.uploaded, "downloaded": p.downloaded, "upload_rate": p.upload_rate, "download_rate": p.download_rate })
                        .to_string(),
                )?;
            }
            return Ok(());
        }
        line(&format!(
            "{:<52}  {:<9}  {:>10}  {:>12}  {:>10}  {:>12}  ADDRS",
            "PEER", "STATE", "UP", "UP RATE", "DOWN", "DOWN RATE"
        ))?;
        for p in peers {
            let state = if p.connected { "connected" } else { "known" };
            line(&format!(
                "{:<52}  {state:<9}  {:>10}  {:>12}  {:>10}  {:>12}  {}",
                p.peer_id,
                human(p.uploaded),
                format!("{}/s", human(p.upload_rate)),
                human(p.downloaded),
                format!("{}/s", human(p.download_rate)),
                p.addrs.join(" ")
            ))?;
        }
        Ok(())
    }

    pub(crate) fn status(&self, s: &pb::NodeStatus) -> Result<()> {
        if self.json {
            let transfers: Vec<_> = s
                .transfers
                .iter()
                .map(|t| json!({ "hash": hex(&t.hash), "verified": t.verified, "total": t.total, "peers": t.peers, "rate": t.rate }))
                .collect();
            return line(
                &json!({ "peer_id": s.peer_id, "addrs": s.listen_addrs, "uploaded": s.uploaded, "downloaded": s.downloaded, "transfers": transfers, "served_cache": { "blobs": s.served_cache_blobs, "bytes": s.served_cache_bytes, "budget": s.served_cache_budget }, "mdns": s.mdns, "dht": s.dht, "announce": s.announce, "max_upload": s.max_upload, "max_download": s.max_download, "timeout": s.stall_timeout_secs, "upload_rate": s.upload_rate, "download_rate": s.download_rate, "connected_peers": s.connected_peers })
                    .to_string(),
            );
        }
        line(&format!("peer id     {}", s.peer_id))?;
        line(&format!("listening   {}", s.listen_addrs.join(" ")))?;
        line(&format!("uploaded    {}", human(s.uploaded)))?;
        line(&format!("downloaded  {}", human(s.downloaded)))?;
        line(&format!(
            "now         up {}/s, down {}/s, {} peer{} connected",
            human(s.upload_rate),
            human(s.download_rate),
            s.connected_peers,
            if s.connected_peers == 1 { "" } else { "s" }
        ))?;
        let on = |b: bool| if b { "on" } else { "off" };
        line(&format!(
            "discovery   mDNS {}, DHT {}, announce {}",
            on(s.mdns),
            on(s.dht),
            on(s.announce)
        ))?;
        let limit = |r: u64| {
            if r == 0 {
                "none".to_string()
            } else {
                format!("{}/s", human(r))
            }
        };
        line(&format!(
            "limits      upload {}, download {}, stall timeout {} s",
            limit(s.max_upload),
            limit(s.max_download),
            s.stall_timeout_secs
        ))?;
        line(&format!(
            "cache       {} small blobs served lately, {} of {} in memory",
            s.served_cache_blobs,
            human(s.served_cache_bytes),
            human(s.served_cache_budget)
        ))?;
        if s.transfers.is_empty() {
            line("transfers   none")?;
        }
        for t in &s.transfers {
            line(&format!(
                "transfer    {}  {}%  {} peer{}  {}/s",
                hex(&t.hash),
                percent(t.verified, t.total),
                t.peers,
                if t.peers == 1 { "" } else { "s" },
                human(t.rate)
            ))?;
        }
        Ok(())
    }

    pub(crate) fn fetched(&self, r: &FetchReport) -> Result<()> {
        let secs = r.elapsed.as_secs_f64().max(1e-3);
        if self.json {
            line(
                &json!({ "hash": r.hash.to_hex().as_str(), "bytes": r.bytes, "files": r.files, "received": r.received, "seconds": secs, "kind": if r.kind == BlobKind::Collection { "collection" } else { "blob" } })
                    .to_string(),
            )
        } else {
            // The rate of what came over the network: what was here
            // already took no time to fetch (it showed 216 MiB/s for a
            // get that received nothing).
            let how = if r.received == 0 {
                "all of it here already".to_string()
            } else {
                format!(
                    "received {} at {}/s",
                    human(r.received),
                    human((r.received as f64 / secs) as u64)
                )
            };
            note!(
                "fetched {} ({}, {} file{}) in {secs:.2}s: {how}",
                r.hash,
                human(r.bytes),
                r.files,
                if r.files == 1 { "" } else { "s" },
            );
            Ok(())
        }
    }
}

/// An indicatif bar on stderr, only when it is a terminal.
pub(crate) struct ProgressBar {
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressBar {
    pub(crate) fn new(show: bool) -> Self {
        let bar = show.then(|| {
            let b = indicatif::ProgressBar::new(0);
            let style = indicatif::ProgressStyle::with_template(
                "{bar:40.cyan/blue} {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            b.set_style(style);
            b.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            b
        });
        ProgressBar { bar }
    }

    pub(crate) fn update(&self, p: &Progress) {
        if let Some(b) = &self.bar {
            b.set_length(p.total);
            b.set_position(p.verified);
            b.set_message(progress_message(p));
        }
    }

    pub(crate) fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The bar's text after the byte counts: the node's recent rate, the time
/// left at that rate, the peers and files. The rate is the node's (a
/// moving average over the last second or so), not indicatif's own, which
/// averages over a long window and read half the real rate for most of a
/// five-second get.
fn progress_message(p: &Progress) -> String {
    let eta = match p.total.saturating_sub(p.verified) {
        0 => "0s".to_string(),
        _ if p.rate == 0 => "?".to_string(),
        left => {
            let secs = left.div_ceil(p.rate);
            match secs {
                0..60 => format!("{secs}s"),
                60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
                _ => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
            }
        }
    };
    let files = if p.files_total > 0 {
        format!(", {}/{} files", p.files_done, p.files_total)
    } else {
        String::new()
    };
    format!(
        "{}/s eta {eta} {} peer{}{files}",
        human(p.rate),
        p.peers,
        if p.peers == 1 { "" } else { "s" }
    )
}

/// A name as a table shows it: control characters escaped (`\n`, `\t`,
/// `\u{1b}`), so that each row is one line and a name cannot drive the
/// terminal.
fn shown(name: &str) -> std::borrow::Cow<'_, str> {
    if name.chars().any(char::is_control) {
        name.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        name.into()
    }
}

/// `b3sum`'s line for `path`: `<hash>  <path>`, where a path holding a
/// backslash or a newline is written with both escaped (`\\`, `\n`) and
/// the line starts with a backslash, so that every line is one entry and
/// `b3sum --check` can read it back.
fn b3sum_line(hash: &Hash, path: &Path) -> String {
    let name = path.to_string_lossy();
    if name.contains(['\\', '\n']) {
        let escaped = name.replace('\\', "\\\\").replace('\n', "\\n");
        format!("\\{}  {escaped}", hash.to_hex())
    } else {
        format!("{}  {name}", hash.to_hex())
    }
}

/// `part` of `whole` in whole percent, rounded down: 99.6% is not shown as
/// 100% beside what is complete.
fn percent(part: u64, whole: u64) -> u128 {
    (u128::from(part) * 100)
        .checked_div(u128::from(whole))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_one_line_and_drive_no_terminal() {
        assert_eq!(shown("plain name.txt"), "plain name.txt");
        assert_eq!(shown("a\nb\tc"), "a\\nb\\tc");
        assert_eq!(shown("\u{1b}[31mred"), "\\u{1b}[31mred");
    }

    #[test]
    fn add_lines_escape_paths_as_b3sum_does() {
        let h = blake3::hash(b"x");
        let hex = h.to_hex();
        assert_eq!(
            b3sum_line(&h, Path::new("dir/a b.txt")),
            format!("{hex}  dir/a b.txt")
        );
        assert_eq!(b3sum_line(&h, Path::new("a\nb")), format!("\\{hex}  a\\nb"));
        assert_eq!(
            b3sum_line(&h, Path::new("c\\d")),
            format!("\\{hex}  c\\\\d")
        );
        assert_eq!(b3sum_line(&h, Path::new("a\rb")), format!("{hex}  a\rb"));
    }

    #[test]
    fn the_bar_says_the_nodes_rate_and_the_time_left_at_it() {
        let p = |verified, total, rate, peers| Progress {
            verified,
            total,
            rate,
            peers,
            ..Progress::default()
        };
        assert_eq!(
            progress_message(&p(0, 20 << 20, 4 << 20, 1)),
            "4.0 MiB/s eta 5s 1 peer"
        );
        assert_eq!(
            progress_message(&p(1 << 20, 600 << 20, 1 << 20, 3)),
            "1.0 MiB/s eta 9m 59s 3 peers"
        );
        assert_eq!(
            progress_message(&p(0, 10 << 30, 1 << 20, 2)),
            "1.0 MiB/s eta 2h 50m 2 peers"
        );
        assert_eq!(progress_message(&p(0, 100, 0, 0)), "0 B/s eta ? 0 peers");
        assert_eq!(progress_message(&p(100, 100, 0, 1)), "0 B/s eta 0s 1 peer");
        let mut files = p(5, 10, 1, 2);
        files.files_done = 1;
        files.files_total = 4;
        assert_eq!(progress_message(&files), "1 B/s eta 5s 2 peers, 1/4 files");
    }

    #[test]
    fn percent_rounds_down() {
        assert_eq!(percent(996, 1000), 99);
        assert_eq!(percent(1000, 1000), 100);
        assert_eq!(percent(5, 0), 0);
        assert_eq!(percent(u64::MAX, u64::MAX), 100);
    }
}
