use std::sync::atomic::AtomicUsize;

use super::*;
use crate::virtio::block::{Disk, DiskConfig};
use snapshot::ChunkSourceError;

const CHUNK: u64 = 64 * 1024;

/// Chunks in memory; `bad` chunks fail to read (as damaged ones would); counts reads.
struct MemSource {
    data: Vec<u8>,
    bad: Vec<u64>,
    reads: AtomicUsize,
}

impl ChunkSource for MemSource {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn chunk_size(&self) -> u64 {
        CHUNK
    }
    fn chunk_count(&self) -> u64 {
        (self.data.len() as u64).div_ceil(CHUNK)
    }
    fn is_zero_chunk(&self, index: u64) -> bool {
        let s = (index * CHUNK) as usize;
        let e = (s + CHUNK as usize).min(self.data.len());
        self.data[s..e].iter().all(|b| *b == 0)
    }
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), ChunkSourceError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if self.bad.contains(&index) {
            return Err(ChunkSourceError::Repo(
                snapshot::repo::RepoError::ChunkMissing {
                    id: format!("chunk{index}"),
                },
            ));
        }
        let s = (index * CHUNK) as usize;
        buf.copy_from_slice(&self.data[s..s + buf.len()]);
        Ok(())
    }
}

struct Fixture {
    dir: PathBuf,
    path: PathBuf,
    data: Vec<u8>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture(tag: &str) -> Fixture {
    let dir = std::env::temp_dir().join(format!("arkvm-hydrate-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // 5.5 chunks; chunk 2 all zero.
    let len = 5 * CHUNK as usize + CHUNK as usize / 2;
    let mut data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 | 1).collect();
    data[2 * CHUNK as usize..3 * CHUNK as usize].fill(0);
    let path = dir.join("disk.img");
    Fixture { dir, path, data }
}

fn open(fx: &Fixture, bad: Vec<u64>, fatal: Arc<AtomicUsize>) -> (Disk, Arc<Hydration>) {
    let file = std::fs::File::create(&fx.path).unwrap();
    file.set_len(fx.data.len() as u64).unwrap();
    let source = Arc::new(MemSource {
        data: fx.data.clone(),
        bad,
        reads: AtomicUsize::new(0),
    });
    let h = Arc::new(Hydration::new(
        "disk d of point test".into(),
        file,
        source,
        Duration::from_millis(300),
        Box::new(move |_| {
            fatal.fetch_add(1, Ordering::SeqCst);
        }),
    ));
    register(&fx.path, h.clone());
    let cfg: DiskConfig = fx.path.display().to_string().parse().unwrap();
    (Disk::open(&cfg).unwrap(), h)
}

#[test]
fn reads_come_from_the_point_and_the_file_ends_as_point_plus_writes() {
    let fx = fixture("rw");
    let fatal = Arc::new(AtomicUsize::new(0));
    let (disk, h) = open(&fx, vec![], fatal.clone());
    let mut buf = vec![0u8; 3 * CHUNK as usize];
    disk.read_at(CHUNK / 2, &mut buf).unwrap();
    assert_eq!(buf, fx.data[CHUNK as usize / 2..][..buf.len()]);
    // A partial write into a chunk not yet fetched keeps the rest of the chunk.
    disk.write_at(4 * CHUNK + 512, &[0xEE; 1024]).unwrap();
    let p = h.progress();
    assert!(!p.done && p.bytes_done < p.bytes_total, "{p:?}");
    assert!(h.hydrate_all(&mut |_| {}));
    let p = h.progress();
    assert!(p.done && p.bytes_done == p.bytes_total && p.error.is_none());
    let mut expect = fx.data.clone();
    expect[4 * CHUNK as usize + 512..][..1024].fill(0xEE);
    assert_eq!(std::fs::read(&fx.path).unwrap(), expect);
    let mut all = vec![0u8; expect.len()];
    disk.read_at(0, &mut all).unwrap();
    assert_eq!(all, expect);
    assert_eq!(fatal.load(Ordering::SeqCst), 0);
}

#[test]
fn a_chunk_that_cannot_be_read_is_never_served_and_fails_once() {
    let fx = fixture("bad");
    let fatal = Arc::new(AtomicUsize::new(0));
    let (disk, h) = open(&fx, vec![3], fatal.clone());
    let mut ok = vec![0u8; CHUNK as usize];
    disk.read_at(0, &mut ok).unwrap();
    assert_eq!(ok, fx.data[..CHUNK as usize]);
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    let err = disk.read_at(3 * CHUNK, &mut buf).unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(250), "no retry");
    assert!(snapshot::error_chain(&err).contains("chunk 3"), "{err}");
    assert_eq!(buf, vec![0u8; 4096], "bytes were handed out");
    // A write to it is refused too, and the background pass stops at it.
    assert!(disk.write_at(3 * CHUNK, &[1; 512]).is_err());
    assert!(!h.hydrate_all(&mut |_| {}));
    let p = h.progress();
    assert!(!p.done);
    assert!(p.error.as_deref().unwrap_or("").contains("point test"));
    assert_eq!(fatal.load(Ordering::SeqCst), 1, "the owner is told once");
}
