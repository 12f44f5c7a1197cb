//! The content-addressed blob store: atomic publication, dedupe, verification, crash safety.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hindsight::store::{BlobStatus, BlobStore, Digest};
use hindsight::Error;

fn temp_store() -> (tempfile::TempDir, BlobStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open(dir.path().join("store")).unwrap();
    (dir, store)
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn put_then_read_back_under_the_content_digest() {
    let (_dir, store) = temp_store();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (digest, len) = store.put(&data[..]).unwrap();
    assert_eq!(digest, Digest::of(&data));
    assert_eq!(len, data.len() as u64);
    assert!(store.contains(&digest));
    assert_eq!(store.size(&digest).unwrap(), len);
    // Fan-out layout: blobs/ab/cd/abcd…
    let hex = digest.to_hex();
    let rel = store
        .path(&digest)
        .strip_prefix(store.root())
        .unwrap()
        .to_owned();
    assert_eq!(
        rel,
        Path::new("blobs")
            .join(&hex[..2])
            .join(&hex[2..4])
            .join(&hex)
    );
    let mut back = Vec::new();
    store
        .open_verified(&digest)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back, data);
    assert_eq!(store.verify(&digest).unwrap(), BlobStatus::Intact);
    assert_eq!(store.list().unwrap(), vec![digest]);
    assert!(store.temp_files().unwrap().is_empty());
    // The empty blob is a blob too.
    let (empty, n) = store.put(&b""[..]).unwrap();
    assert_eq!((empty, n), (Digest::of(b""), 0));
}

#[test]
fn streamed_writes_with_early_writeback_keep_every_byte() {
    for streaming in [false, true] {
        streamed_write(streaming);
    }
}

fn streamed_write(streaming: bool) {
    // 50 MiB in uneven pieces: several 16 MiB writeback ranges are started, waited for and
    // dropped from the page cache before `finish`, and the tail after the last boundary is
    // left to the fsync.
    let (_dir, store) = temp_store();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let data: Vec<u8> = (0..50 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let writer = store.writer().unwrap();
    let mut writer = if streaming {
        writer.with_streaming_writeback()
    } else {
        writer.with_early_writeback()
    };
    let mut rest = &data[..];
    let mut piece = 1usize;
    while !rest.is_empty() {
        let n = piece.min(rest.len());
        writer.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
        piece = piece * 3 % 7_000_001 + 1;
    }
    assert_eq!(writer.len(), data.len() as u64);
    let (digest, len) = writer.finish().unwrap();
    assert_eq!(digest, Digest::of(&data));
    assert_eq!(len, data.len() as u64);
    let back = std::fs::read(store.path(&digest)).unwrap();
    assert!(
        back == data,
        "the published blob differs from what was written"
    );
    assert_eq!(store.verify(&digest).unwrap(), BlobStatus::Intact);
}

#[test]
fn identical_content_is_stored_once() {
    let (_dir, store) = temp_store();
    let (a, _) = store.put(&b"same bytes"[..]).unwrap();
    let (b, _) = store.put(&b"same bytes"[..]).unwrap();
    assert_eq!(a, b);
    // Concurrent writers of the same content all succeed and leave one file.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let (d, _) = store.put(&vec![42u8; 1 << 20][..]).unwrap();
                assert_eq!(d, Digest::of(&vec![42u8; 1 << 20]));
            });
        }
    });
    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(files_under(&store.root().join("blobs")).len(), 2);
    assert!(store.temp_files().unwrap().is_empty());
}

#[test]
fn a_damaged_copy_of_the_same_content_is_replaced_on_the_next_write() {
    let (_dir, store) = temp_store();
    let data = vec![9u8; 50_000];
    let (d, _) = store.put(&data[..]).unwrap();
    // Truncated behind our back (a torn copy, a bad restore).
    std::fs::remove_file(store.path(&d)).unwrap(); // blobs are read-only
    std::fs::write(store.path(&d), &data[..1000]).unwrap();
    assert!(matches!(
        store.verify(&d).unwrap(),
        BlobStatus::Corrupt { .. }
    ));
    // Writing the content again repairs it instead of deduping against the damaged file.
    store.put(&data[..]).unwrap();
    assert_eq!(store.verify(&d).unwrap(), BlobStatus::Intact);
}

#[test]
fn a_same_size_damaged_copy_is_replaced_too() {
    let (_dir, store) = temp_store();
    let data: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (d, _) = store.put(&data[..]).unwrap();
    // One flipped bit: same size, other content.
    let mut damaged = data.clone();
    damaged[12_345] ^= 0x10;
    std::fs::remove_file(store.path(&d)).unwrap(); // blobs are read-only
    std::fs::write(store.path(&d), &damaged).unwrap();
    assert!(matches!(
        store.verify(&d).unwrap(),
        BlobStatus::Corrupt { .. }
    ));
    store.put(&data[..]).unwrap();
    assert_eq!(store.verify(&d).unwrap(), BlobStatus::Intact);
    assert!(std::fs::metadata(store.path(&d))
        .unwrap()
        .permissions()
        .readonly());
    // Mode 0444, as the README says: readable by all (hard links are handed out), writable
    // by none.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(store.path(&d))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o444
    );
}

#[test]
fn an_unfinished_writer_leaves_nothing() {
    let (_dir, store) = temp_store();
    {
        let mut w = store.writer().unwrap();
        w.write_all(b"half a blob").unwrap();
        assert_eq!(w.len(), 11);
        assert_eq!(w.digest_so_far(), Digest::of(b"half a blob"));
        assert_eq!(store.temp_files().unwrap().len(), 1);
    }
    assert!(store.list().unwrap().is_empty());
    assert!(store.temp_files().unwrap().is_empty());
}

#[test]
fn verify_finds_flipped_bytes_and_missing_files() {
    let (_dir, store) = temp_store();
    let (good, _) = store.put(&b"untouched"[..]).unwrap();
    let (bad, _) = store.put(&vec![1u8; 100_000][..]).unwrap();
    let (gone, _) = store.put(&b"deleted behind our back"[..]).unwrap();
    // Flip one byte in the middle of `bad`, and delete `gone`.
    let path = store.path(&bad);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[50_000] ^= 0x01;
    std::fs::remove_file(&path).unwrap(); // blobs are read-only
    std::fs::write(&path, &bytes).unwrap();
    std::fs::remove_file(store.path(&gone)).unwrap();

    assert_eq!(store.verify(&good).unwrap(), BlobStatus::Intact);
    assert_eq!(
        store.verify(&bad).unwrap(),
        BlobStatus::Corrupt {
            actual: Digest::of(&bytes)
        }
    );
    assert_eq!(store.verify(&gone).unwrap(), BlobStatus::Missing);
    // A verified read of the corrupt blob fails at the end instead of returning bad bytes
    // silently.
    let mut sink = Vec::new();
    let err = store
        .open_verified(&bad)
        .unwrap()
        .read_to_end(&mut sink)
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(err.to_string().contains(&bad.to_hex()), "{err}");
    assert!(matches!(
        store.open_verified(&gone),
        Err(Error::MissingBlob(_))
    ));
}

#[test]
fn the_format_is_checked_on_open() {
    let (dir, store) = temp_store();
    let root = store.root().to_owned();
    assert_eq!(
        std::fs::read_to_string(root.join("VERSION")).unwrap(),
        "hindsight-blobs 1\n"
    );
    drop(store);
    BlobStore::open(&root).unwrap();
    std::fs::write(root.join("VERSION"), "hindsight-blobs 99\n").unwrap();
    let err = BlobStore::open(&root).unwrap_err();
    assert!(matches!(err, Error::StoreFormat { .. }), "{err}");
    drop(dir);
}

#[test]
fn listing_ignores_foreign_files_and_remove_works() {
    let (_dir, store) = temp_store();
    let (d, _) = store.put(&b"keep"[..]).unwrap();
    std::fs::write(store.root().join("blobs").join("README"), "not a blob").unwrap();
    let misplaced = store.root().join("blobs/00/00");
    std::fs::create_dir_all(&misplaced).unwrap();
    std::fs::write(misplaced.join(Digest::of(b"x").to_hex()), "x").unwrap();
    assert_eq!(store.list().unwrap(), vec![d]);
    assert!(store.remove(&d).unwrap());
    assert!(!store.remove(&d).unwrap());
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn clean_temp_spares_fresh_files() {
    let (_dir, store) = temp_store();
    let mut w = store.writer().unwrap();
    w.write_all(b"in progress").unwrap();
    w.flush().unwrap();
    assert_eq!(store.clean_temp(Duration::from_secs(3600)).unwrap(), 0);
    assert_eq!(store.temp_files().unwrap().len(), 1);
    let (d, _) = w.finish().unwrap();
    assert!(store.contains(&d));
}

/// Child side of the crash tests: writes into the store given by the environment and never
/// finishes. `HINDSIGHT_STORE_CHILD_MODE` is `writing` (keeps writing) or `written` (writes
/// 8 MiB, flushes, then waits before it would publish).
fn crash_child() -> bool {
    let Ok(root) = std::env::var("HINDSIGHT_STORE_CHILD") else {
        return false;
    };
    let store = BlobStore::open(root).unwrap();
    let mut w = store.writer().unwrap();
    let chunk = vec![7u8; 1 << 20];
    match std::env::var("HINDSIGHT_STORE_CHILD_MODE").as_deref() {
        Ok("written") => {
            for _ in 0..8 {
                w.write_all(&chunk).unwrap();
            }
            w.flush().unwrap();
            std::fs::write(store.root().join("ready"), "").unwrap();
            std::thread::sleep(Duration::from_secs(600));
        }
        _ => loop {
            w.write_all(&chunk).unwrap();
            w.flush().unwrap();
            std::thread::sleep(Duration::from_millis(5));
        },
    }
    true
}

fn kill_child_and_check(mode: &str) {
    let (_dir, store) = temp_store();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_entry",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("HINDSIGHT_STORE_CHILD", store.root())
        .env("HINDSIGHT_STORE_CHILD_MODE", mode)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = match mode {
            "written" => store.root().join("ready").exists(),
            _ => store.temp_files().unwrap().iter().any(|p| {
                std::fs::metadata(p)
                    .map(|m| m.len() >= 4 << 20)
                    .unwrap_or(false)
            }),
        };
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "child never got going");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap(); // SIGKILL on Unix: no destructor runs
    child.wait().unwrap();
    // Nothing was published; the orphan in tmp/ is all that is left, and cleaning removes it.
    assert!(store.list().unwrap().is_empty());
    assert!(files_under(&store.root().join("blobs")).is_empty());
    assert_eq!(store.temp_files().unwrap().len(), 1);
    assert_eq!(store.clean_temp(Duration::ZERO).unwrap(), 1);
    assert!(store.temp_files().unwrap().is_empty());
    // The store is still fully usable.
    let (d, _) = store.put(&b"after the crash"[..]).unwrap();
    assert_eq!(store.verify(&d).unwrap(), BlobStatus::Intact);
}

#[test]
fn crash_child_entry() {
    // Does nothing in a normal run; it is the body of the child process in the crash tests.
    if crash_child() {
        unreachable!("the crash child is killed, never returns");
    }
}

#[test]
fn a_writer_killed_mid_write_publishes_nothing() {
    kill_child_and_check("writing");
}

#[test]
fn a_writer_killed_before_publishing_publishes_nothing() {
    kill_child_and_check("written");
}

#[test]
fn checksums_are_xxh3_128_and_streaming_agrees_with_one_shot() {
    use hindsight::store::{Checksum, ChecksumHasher};
    // XXH3-128 of the empty input (seed 0, default secret), as every implementation gives it.
    assert_eq!(
        Checksum::of(b"").to_hex(),
        "99aa06d3014798d86001c324468d497f"
    );
    let data: Vec<u8> = (0..1_000_003u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut h = ChecksumHasher::new();
    for piece in data.chunks(65_537) {
        h.update(piece);
    }
    assert_eq!(h.finish(), Checksum::of(&data));
    let hex = h.finish().to_hex();
    assert_eq!(hex.parse::<Checksum>().unwrap(), h.finish());
    assert!("xyz".parse::<Checksum>().is_err());
    // A blob written through the store carries the checksum of its bytes.
    let dir = tempfile::tempdir().unwrap();
    let store = hindsight::store::BlobStore::open(dir.path()).unwrap();
    let mut w = store.writer().unwrap();
    std::io::Write::write_all(&mut w, &data).unwrap();
    assert_eq!(w.checksum_so_far(), Checksum::of(&data));
    let (digest, _) = w.finish().unwrap();
    let (status, checksum) = store.verify_with_checksum(&digest).unwrap();
    assert_eq!(status, hindsight::store::BlobStatus::Intact);
    assert_eq!(checksum, Some(Checksum::of(&data)));
}
