//! Throughput of the snapshot format and the repository on one file system, for
//! `scripts/bench`: `cargo run --release -p snapshot --example format_bench -- DIR [MIB]`.
//!
//! Writes and verifies a snapshot directory of MIB MiB of memory (default 512), then takes a full
//! and a 1%-dirty incremental backup of the same memory into a repository, verifies and restores
//! it. Prints one `name value unit` line per figure. Everything it creates under DIR is removed.

use std::error::Error;
use std::path::Path;
use std::time::Instant;

use snapshot::repo::Repository;
use snapshot::{PartKind, SnapshotReader, SnapshotWriter, CHUNK_SIZE};

/// Guest-like memory: a quarter of the chunks zero, the rest text-like and partly random.
fn guest_memory(mib: usize) -> Vec<u8> {
    let mut mem = vec![0u8; mib * CHUNK_SIZE];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for (i, chunk) in mem.chunks_mut(CHUNK_SIZE).enumerate() {
        if i % 4 == 0 {
            continue;
        }
        for (j, b) in chunk.iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = if j % 8 == 0 {
                x as u8
            } else {
                b"arkvm guest page "[j % 17]
            };
        }
    }
    mem
}

fn rate(mib: usize, start: Instant) -> f64 {
    mib as f64 / start.elapsed().as_secs_f64()
}

fn main() -> Result<(), Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let base = args.next().ok_or("usage: format_bench DIR [MIB]")?;
    let mib: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(512);
    let base = Path::new(&base).join(format!("format-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    let mem = guest_memory(mib);

    let dir = base.join("snap");
    let start = Instant::now();
    let mut snap = SnapshotWriter::create(&dir)?;
    let part = snap.add_memory_part("memory", mem.len() as u64, CHUNK_SIZE as u64)?;
    for (i, chunk) in mem.chunks(CHUNK_SIZE).enumerate() {
        part.write_chunk(i as u64, chunk)?;
    }
    snap.finish_memory_part(part)?;
    snap.commit()?;
    println!("snapshot_write {:.0} MiB/s", rate(mib, start));
    let start = Instant::now();
    SnapshotReader::open(&dir)?.verify_all(|_| ())?;
    println!("snapshot_verify {:.0} MiB/s", rate(mib, start));

    let repo = Repository::init(&base.join("repo"), None)?;
    let start = Instant::now();
    let mut backup = repo.start_backup("bench", None)?;
    let object = backup.add_object("memory", PartKind::Memory, mem.len() as u64)?;
    for (i, chunk) in mem.chunks(CHUNK_SIZE).enumerate() {
        object.put_chunk(i as u64, chunk)?;
    }
    backup.finish_object(object)?;
    let full = backup.commit()?;
    let full_secs = start.elapsed().as_secs_f64();
    println!("repo_full_backup {:.0} MiB/s", rate(mib, start));
    println!("repo_full_stored {} bytes", full.stats.bytes_stored);

    let start = Instant::now();
    let mut backup = repo.start_backup("bench", Some(&full.id))?;
    let object = backup.add_object("memory", PartKind::Memory, mem.len() as u64)?;
    for (i, chunk) in mem.chunks(CHUNK_SIZE).enumerate() {
        if i % 100 == 7 {
            let mut dirty = chunk.to_vec();
            dirty[0] ^= 0xff;
            object.put_chunk(i as u64, &dirty)?;
        } else {
            object.reuse_parent_chunk(i as u64)?;
        }
    }
    backup.finish_object(object)?;
    let incremental = backup.commit()?;
    let incr_secs = start.elapsed().as_secs_f64();
    println!("repo_incremental_time_ratio {:.4}", incr_secs / full_secs);
    println!(
        "repo_incremental_bytes_ratio {:.4}",
        incremental.stats.bytes_stored as f64 / full.stats.bytes_stored.max(1) as f64
    );
    println!(
        "repo_compression_ratio {:.2}",
        mem.len() as f64 / full.stats.bytes_stored.max(1) as f64
    );

    let start = Instant::now();
    let report = repo.verify(|_| ())?;
    println!(
        "repo_verify {:.0} MiB/s clean={}",
        rate(mib, start),
        report.is_clean()
    );
    let start = Instant::now();
    let mut restored = Vec::with_capacity(mem.len());
    repo.read_object(&incremental, "memory", &mut restored)?;
    println!("repo_restore_read {:.0} MiB/s", rate(mib, start));

    std::fs::remove_dir_all(&base)?;
    Ok(())
}
