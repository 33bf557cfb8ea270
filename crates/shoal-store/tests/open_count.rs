//! `Store::open_count` in a process of its own (the count is global: the
//! library's unit tests open stores in parallel).

use shoal_store::Store;

#[test]
fn a_store_counts_as_open_until_its_last_clone_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(Store::open_count(), 0);
    let a = Store::open(&dir.path().join("a")).unwrap();
    let b = Store::open(&dir.path().join("b")).unwrap();
    assert_eq!(Store::open_count(), 2);
    // In memory: nothing to close.
    let m = Store::in_memory();
    assert_eq!(Store::open_count(), 2);
    drop(m);
    // A clone that outlives its caller in another thread keeps it open.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let held = a.clone();
    let t = std::thread::spawn(move || {
        rx.recv().unwrap();
        drop(held);
    });
    drop(a);
    assert_eq!(Store::open_count(), 2);
    tx.send(()).unwrap();
    t.join().unwrap();
    assert_eq!(Store::open_count(), 1);
    drop(b);
    assert_eq!(Store::open_count(), 0);
    // And the closed store opens again.
    let a = Store::open(&dir.path().join("a")).unwrap();
    assert_eq!(Store::open_count(), 1);
    drop(a);
    assert_eq!(Store::open_count(), 0);
}
