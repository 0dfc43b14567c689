//! scratch
use snapshot::repo::Repository;
use snapshot::PartKind;
use std::time::Instant;
fn main() {
    let root = std::path::Path::new("/tmp/fmt-repo");
    let _ = std::fs::remove_dir_all(root);
    let repo = Repository::init(root).unwrap();
    let n = 512usize;
    // semi-compressible memory: 1/4 zero chunks, rest patterned with noise
    let mut mem = vec![0u8; n << 20];
    let mut x = 12345u64;
    for (i, c) in mem.chunks_mut(1 << 20).enumerate() {
        if i % 4 == 0 {
            continue;
        }
        for (j, b) in c.iter_mut().enumerate() {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = if j % 3 == 0 {
                (x >> 56) as u8
            } else {
                (j as u8) ^ (i as u8)
            };
        }
    }
    for threads in [1usize, 2] {
        let _ = std::fs::remove_dir_all(root);
        let repo2 = Repository::init(root).unwrap();
        let start = Instant::now();
        let mut w = repo2.start_backup("vm1", None).unwrap();
        let o = w
            .add_object("memory", PartKind::Memory, mem.len() as u64)
            .unwrap();
        std::thread::scope(|s| {
            for t in 0..threads {
                let o = &o;
                let mem = &mem;
                s.spawn(move || {
                    for i in (t..n).step_by(threads) {
                        o.put_chunk(i as u64, &mem[i << 20..(i + 1) << 20]).unwrap();
                    }
                });
            }
        });
        w.finish_object(o).unwrap();
        let p = w.commit().unwrap();
        let el = start.elapsed();
        println!(
            "full backup {n} MiB, {threads} threads: {:?} = {:.0} MiB/s, stored {} MiB",
            el,
            n as f64 / el.as_secs_f64(),
            p.stats.bytes_stored >> 20
        );
        let start = Instant::now();
        let mut w = repo2.start_backup("vm1", Some(&p.id)).unwrap();
        let o = w
            .add_object("memory", PartKind::Memory, mem.len() as u64)
            .unwrap();
        for i in 0..n {
            if i % 100 == 1 {
                o.put_chunk(i as u64, &vec![i as u8; 1 << 20]).unwrap();
            } else {
                o.reuse_parent_chunk(i as u64).unwrap();
            }
        }
        w.finish_object(o).unwrap();
        let p2 = w.commit().unwrap();
        println!(
            "incremental: {:?}, new {} chunks, stored {} bytes",
            start.elapsed(),
            p2.stats.chunks_new,
            p2.stats.bytes_stored
        );
        let start = Instant::now();
        let r = repo2.verify(|_| ()).unwrap();
        println!(
            "verify {} chunks: {:?} clean={}",
            r.chunks_checked,
            start.elapsed(),
            r.is_clean()
        );
        let start = Instant::now();
        let pt = repo2.read_point(&p.id).unwrap();
        let mut out = Vec::with_capacity(mem.len());
        repo2.read_object(&pt, "memory", &mut out).unwrap();
        assert!(out == mem);
        println!("restore read: {:?}", start.elapsed());
    }
    drop(repo);
    let _ = std::fs::remove_dir_all(root);
}
