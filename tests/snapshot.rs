//! Complete VM snapshots and restore in a new process (issue 4): the memory guest continues
//! where it was snapshotted, twice over; 4 vCPUs keep their mp_state; every kind of damage to
//! a snapshot is refused with a one-line error.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use arkvm_tests::{
    api_json, check_restored_memory_guest, cli_snapshot, one_at_a_time, read_snapshot_state,
    require_kvm, run_to_end_settled, snapshot_memory_guest, start_memory_guest, start_restore,
    ScratchDir, Vmm,
};

/// KVM's mp_state values.
const MP_STATE_RUNNABLE: u32 = 0;
const MP_STATE_UNINITIALIZED: u32 = 1;

#[test]
fn memory_guest_continues_after_snapshot_restore_twice() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("snap-twice");
    let sock0 = dir.path().join("vm0.sock");
    let mut vm0 = start_memory_guest(&sock0, "256M", 1, "arkvm.region_mb=128");

    // First: a paused snapshot of the original, taken mid-run.
    let snap1 = dir.path().join("snap1");
    let w1 = snapshot_memory_guest(&vm0, &sock0, &snap1, &["--paused"]);
    assert_eq!(w1.report["mode"], "paused", "{}", w1.report);
    vm0.kill();
    let sock1 = dir.path().join("vm1.sock");
    let t = Instant::now();
    let mut vm1 = start_restore(&snap1, &sock1, &[]);
    check_restored_memory_guest(&vm1, &w1, 5, Duration::from_secs(10));
    eprintln!("first restore: PASS lines resumed within {:?}", t.elapsed());
    let (code, info) = api_json(&sock1, "GET", "/vm", None);
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(
        info["config"]["restored_from"],
        snap1.display().to_string(),
        "{info}"
    );

    // Second: snapshot the restored VM (paused again), kill it, restore that.
    let snap2 = dir.path().join("snap2");
    let w2 = snapshot_memory_guest(&vm1, &sock1, &snap2, &["--paused"]);
    assert!(
        w2.gen_before >= w1.gen_after,
        "the restored VM's progress ({}) is behind the first snapshot ({})",
        w2.gen_before,
        w1.gen_after
    );
    vm1.kill();
    let sock2 = dir.path().join("vm2.sock");
    let mut vm2 = start_restore(&snap2, &sock2, &[]);
    check_restored_memory_guest(&vm2, &w2, 5, Duration::from_secs(10));

    // Third: a live (default cow) snapshot of the twice-restored VM, restored once more.
    let snap3 = dir.path().join("snap3");
    let w3 = snapshot_memory_guest(&vm2, &sock2, &snap3, &[]);
    assert_eq!(w3.report["mode"], "live", "{}", w3.report);
    vm2.kill();
    let sock3 = dir.path().join("vm3.sock");
    let vm3 = start_restore(&snap3, &sock3, &[]);
    check_restored_memory_guest(&vm3, &w3, 5, Duration::from_secs(10));
}

fn mp_states(state: &serde_json::Value) -> Vec<(u64, u32)> {
    let vcpus = state["vcpus"].as_array().expect("state has a vcpus array");
    vcpus
        .iter()
        .map(|v| {
            let id = v["id"].as_u64().expect("vcpu id");
            let bytes: Vec<u8> = v["mp_state"]
                .as_array()
                .expect("mp_state is a byte array")
                .iter()
                .map(|b| b.as_u64().expect("byte") as u8)
                .collect();
            assert_eq!(bytes.len(), 4, "mp_state is one u32: {bytes:?}");
            (id, u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
        })
        .collect()
}

fn assert_aps_waiting(state: &serde_json::Value, what: &str) {
    let mp = mp_states(state);
    assert_eq!(
        mp.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "{what}: vCPU ids"
    );
    assert_eq!(
        mp[0].1, MP_STATE_RUNNABLE,
        "{what}: the boot vCPU runs: {mp:?}"
    );
    for (id, s) in &mp[1..] {
        assert_eq!(
            *s, MP_STATE_UNINITIALIZED,
            "{what}: AP {id} should still wait for INIT/SIPI: {mp:?}"
        );
    }
    for v in state["vcpus"].as_array().expect("vcpus") {
        for part in [
            "regs",
            "sregs",
            "lapic",
            "xsave",
            "msrs",
            "vcpu_events",
            "cpuid",
        ] {
            assert!(
                v[part].as_array().is_some_and(|a| !a.is_empty()),
                "{what}: vCPU {} has no {part}",
                v["id"]
            );
        }
    }
    assert_eq!(state["config"]["vcpus"], 4, "{what}: config");
}

#[test]
fn smp_four_vcpus_saved_and_restored_aps_still_waiting() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("snap-smp");
    let sock0 = dir.path().join("vm0.sock");
    let mut vm0 = start_memory_guest(&sock0, "256M", 4, "arkvm.region_mb=64");
    let snap1 = dir.path().join("snap1");
    let w1 = snapshot_memory_guest(&vm0, &sock0, &snap1, &["--paused"]);
    assert_aps_waiting(&read_snapshot_state(&snap1), "snapshot of the original");
    vm0.kill();

    let sock1 = dir.path().join("vm1.sock");
    let vm1 = start_restore(&snap1, &sock1, &[]);
    check_restored_memory_guest(&vm1, &w1, 3, Duration::from_secs(10));
    let (code, info) = api_json(&sock1, "GET", "/vm", None);
    assert_eq!(code, 200, "{info}");
    assert_eq!(info["config"]["vcpus"], 4, "{info}");

    // The restored APs are still waiting: a snapshot of the restored VM shows it.
    let snap2 = dir.path().join("snap2");
    snapshot_memory_guest(&vm1, &sock1, &snap2, &["--paused"]);
    assert_aps_waiting(&read_snapshot_state(&snap2), "snapshot of the restored VM");
}

// ---------------------------------------------------------------------------------------------
// Damage
// ---------------------------------------------------------------------------------------------

/// Copies a snapshot directory (sparse).
fn copy_snapshot(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .args(["-r", "--sparse=always"])
        .arg(from)
        .arg(to)
        .status()
        .expect("run cp");
    assert!(st.success(), "cp failed");
}

fn flip_byte(file: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .expect("open for flipping");
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.read_exact(&mut b).expect("read byte");
    b[0] ^= 0x01;
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&b).expect("write byte");
}

fn truncate(file: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open for truncating")
        .set_len(len)
        .expect("truncate");
}

/// Re-seals a manifest whose text was edited: recomputes `manifest_blake3` over every byte
/// before the hash's first hex digit.
fn reseal_manifest(text: &str) -> String {
    let key = "\"manifest_blake3\": \"";
    let at = text.rfind(key).expect("manifest_blake3 field") + key.len();
    let hash = blake3::hash(&text.as_bytes()[..at]).to_hex();
    format!("{}{}\"\n}}\n", &text[..at], hash)
}

/// IEEE CRC32, as the state frame uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Restores `snap` expecting a refusal: a non-zero exit within `timeout`, one error line on
/// stderr that mentions `needle` (case-insensitive), and no panic. Returns what went wrong
/// instead, so one test can report every case.
fn refused(
    case: &str,
    snap: &Path,
    extra: &[&str],
    needle: &str,
    timeout: Duration,
) -> Result<(), String> {
    let mut args = vec![
        "restore".to_string(),
        "--from".into(),
        snap.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut vmm = Vmm::spawn(&args);
    let Some(status) = vmm.wait_exit(timeout) else {
        let dump = vmm.dump();
        vmm.kill();
        return Err(format!(
            "{case}: arkvm did not exit within {timeout:?}\n{dump}"
        ));
    };
    let err = vmm.stderr_settled();
    let text = err.join("\n");
    if status.success() {
        return Err(format!("{case}: restore succeeded\n{}", vmm.dump()));
    }
    if text.contains("panicked") || text.contains("RUST_BACKTRACE") {
        return Err(format!("{case}: panic\n{}", vmm.dump()));
    }
    if err.len() != 1 {
        return Err(format!("{case}: expected a one-line error\n{}", vmm.dump()));
    }
    if !text.to_lowercase().contains(&needle.to_lowercase()) {
        return Err(format!(
            "{case}: error {text:?} does not mention {needle:?}"
        ));
    }
    if let Some(l) = arkvm_tests::broken_line(&vmm.stdout(), 0) {
        return Err(format!(
            "{case}: the guest ran on damaged memory: {l}\n{}",
            vmm.dump()
        ));
    }
    eprintln!("{case}: refused: {text}");
    Ok(())
}

/// The offsets of a nonzero byte in several different 1 MiB chunks of the memory part.
fn nonzero_offsets(memory: &Path) -> Vec<(u64, u64)> {
    let data = std::fs::read(memory).expect("read memory part");
    let chunk = 1u64 << 20;
    let mut found = Vec::new();
    for c in [0u64, 2, 5, 17, data.len() as u64 / chunk - 1] {
        let start = (c * chunk) as usize;
        let end = ((c + 1) * chunk).min(data.len() as u64) as usize;
        // Take a nonzero byte from the middle of the chunk's nonzero bytes.
        let nz: Vec<usize> = (start..end).filter(|&i| data[i] != 0).collect();
        if let Some(&i) = nz.get(nz.len() / 2) {
            found.push((c, i as u64));
        }
    }
    found
}

#[test]
fn damaged_or_mismatched_snapshot_files_are_refused() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("snap-damage");
    let sock = dir.path().join("vm.sock");
    let mut vm = start_memory_guest(&sock, "64M", 1, "");
    let good = dir.path().join("good");
    snapshot_memory_guest(&vm, &sock, &good, &["--paused"]);
    vm.kill();

    let mut n = 0;
    let mut fresh = |label: &str| -> PathBuf {
        n += 1;
        let p = dir.path().join(format!("case{n}-{label}"));
        copy_snapshot(&good, &p);
        p
    };
    let quick = Duration::from_secs(20);
    let mut failures: Vec<String> = Vec::new();
    let mut expect_refused =
        |case: &str, snap: &Path, extra: &[&str], needle: &str, timeout: Duration| {
            if let Err(e) = refused(case, snap, extra, needle, timeout) {
                eprintln!("FAILED {e}");
                failures.push(e);
            }
        };

    // A control: an undamaged copy restores and runs.
    {
        let p = fresh("control");
        let csock = dir.path().join("control.sock");
        let vm = start_restore(&p, &csock, &[]);
        let from = vm.line_count();
        vm.wait_pass(from, 0, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the undamaged copy does not run\n{}", vm.dump()));
        let from = vm.line_count();
        vm.wait_pass(from, 0, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("the undamaged copy does not run\n{}", vm.dump()));
    }

    // manifest.json: flipped bytes anywhere (start, middle, the version digit, the hash).
    let mlen = std::fs::metadata(good.join("manifest.json"))
        .expect("manifest")
        .len();
    let manifest_text = std::fs::read_to_string(good.join("manifest.json")).expect("manifest");
    let version_digit = manifest_text
        .find("\"format_version\": 1")
        .expect("version") as u64
        + 18;
    for off in [0, 5, version_digit, mlen / 2, mlen - 10, mlen - 1] {
        let p = fresh("manifest-flip");
        flip_byte(&p.join("manifest.json"), off);
        expect_refused(
            &format!("manifest byte {off} flipped"),
            &p,
            &[],
            "manifest",
            quick,
        );
    }
    // state: header, payload, CRC.
    let slen = std::fs::metadata(good.join("state")).expect("state").len();
    for off in [0, 9, 13, 20, slen / 2, slen - 1] {
        let p = fresh("state-flip");
        flip_byte(&p.join("state"), off);
        expect_refused(
            &format!("state byte {off} flipped"),
            &p,
            &[],
            "state",
            quick,
        );
    }
    // Truncated files.
    for (file, lens) in [
        ("manifest.json", vec![0, mlen / 2, mlen - 1]),
        ("state", vec![0, 19, slen / 2, slen - 1]),
        ("memory", vec![0, 1 << 20, (64 << 20) - 1]),
    ] {
        for len in lens {
            let p = fresh("truncated");
            truncate(&p.join(file), len);
            let needle = if file == "manifest.json" {
                "manifest"
            } else {
                file
            };
            expect_refused(
                &format!("{file} truncated to {len}"),
                &p,
                &[],
                needle,
                quick,
            );
        }
    }

    // Missing parts.
    for (file, needle) in [
        ("manifest.json", "manifest"),
        ("state", "state"),
        ("memory", "memory"),
    ] {
        let p = fresh("missing");
        std::fs::remove_file(p.join(file)).expect("remove part");
        expect_refused(&format!("{file} missing"), &p, &[], needle, quick);
    }

    // A future format version, properly sealed, in the manifest.
    {
        let p = fresh("future-manifest");
        let text = manifest_text.replacen("\"format_version\": 1", "\"format_version\": 2", 1);
        std::fs::write(p.join("manifest.json"), reseal_manifest(&text)).expect("write manifest");
        expect_refused("manifest format version 2", &p, &[], "version 2", quick);
    }
    // A future format version in the state frame, with a valid CRC and manifest hash.
    {
        let p = fresh("future-state");
        let mut state = std::fs::read(good.join("state")).expect("state");
        state[8..12].copy_from_slice(&2u32.to_le_bytes());
        let body = state.len() - 4;
        let crc = crc32(&state[..body]);
        state[body..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(p.join("state"), &state).expect("write state");
        let old = blake3::hash(&std::fs::read(good.join("state")).expect("state")).to_hex();
        let new = blake3::hash(&state).to_hex();
        let text = manifest_text.replacen(old.as_str(), new.as_str(), 1);
        assert_ne!(text, manifest_text, "state hash not found in the manifest");
        std::fs::write(p.join("manifest.json"), reseal_manifest(&text)).expect("write manifest");
        expect_refused("state format version 2", &p, &[], "version 2", quick);
    }

    // A different --memory.
    for other in ["128M", "32M"] {
        expect_refused(
            &format!("restore with --memory {other}"),
            &good,
            &["--memory", other],
            "memory",
            quick,
        );
    }
    // The same --memory is accepted (the refusal above is about the size, not the option).
    {
        let csock = dir.path().join("same-mem.sock");
        let vm = start_restore(&good, &csock, &["--memory", "64M"]);
        vm.wait_pass(0, 0, Duration::from_secs(10))
            .unwrap_or_else(|| {
                panic!("restore with the same --memory does not run\n{}", vm.dump())
            });
    }
    assert!(
        failures.is_empty(),
        "{} damage case(s) not refused properly:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn damaged_memory_chunk_stops_the_restored_vm() {
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("snap-damage-mem");
    let sock = dir.path().join("vm.sock");
    let mut vm = start_memory_guest(&sock, "64M", 1, "");
    let good = dir.path().join("good");
    snapshot_memory_guest(&vm, &sock, &good, &["--paused"]);
    vm.kill();

    let mut n = 0;
    let mut fresh = |label: &str| -> PathBuf {
        n += 1;
        let p = dir.path().join(format!("case{n}-{label}"));
        copy_snapshot(&good, &p);
        p
    };
    let mut failures: Vec<String> = Vec::new();
    let mut expect_refused =
        |case: &str, snap: &Path, extra: &[&str], needle: &str, timeout: Duration| {
            if let Err(e) = refused(case, snap, extra, needle, timeout) {
                eprintln!("FAILED {e}");
                failures.push(e);
            }
        };

    // memory: a byte inside several nonzero chunks; restore loads lazily and stops with an
    // error naming the chunk shortly after start.
    let offsets = nonzero_offsets(&good.join("memory"));
    assert!(
        offsets.len() >= 4,
        "memory has too few nonzero chunks: {offsets:?}"
    );
    for (chunk, off) in offsets {
        let p = fresh("memory-flip");
        flip_byte(&p.join("memory"), off);
        expect_refused(
            &format!("memory byte {off} (chunk {chunk}) flipped"),
            &p,
            &[],
            &format!("chunk {chunk}"),
            Duration::from_secs(15),
        );
    }
    // A flip inside an all-zero hole of the memory part, if there is one.
    {
        let data = std::fs::read(good.join("memory")).expect("memory");
        let zero_chunk = data.chunks(1 << 20).position(|c| c.iter().all(|&b| b == 0));
        if let Some(c) = zero_chunk {
            let p = fresh("memory-hole");
            flip_byte(&p.join("memory"), (c as u64) * (1 << 20) + 4096);
            expect_refused(
                &format!("memory byte in zero chunk {c} flipped"),
                &p,
                &[],
                &format!("chunk {c}"),
                Duration::from_secs(15),
            );
        }
    }

    assert!(
        failures.is_empty(),
        "{} damage case(s) not refused properly:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn snapshot_into_an_existing_dir_is_refused() {
    require_kvm();
    let _serial = one_at_a_time();
    let dir = ScratchDir::new("snap-exists");
    let sock = dir.path().join("vm.sock");
    let vm = start_memory_guest(&sock, "64M", 1, "");
    vm.wait_pass(0, 0, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("guest does not run\n{}", vm.dump()));

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let file = dir.path().join("file");
    std::fs::write(&file, b"keep me").expect("write file");
    let full = dir.path().join("full");
    cli_snapshot(&sock, &full, &["--paused"]);
    let full_manifest = std::fs::read(full.join("manifest.json")).expect("manifest");

    for (target, mode) in [
        (&empty, "--paused"),
        (&file, "--paused"),
        (&full, "--paused"),
        (&empty, ""),
        (&full, ""),
    ] {
        let mut args = vec![
            "snapshot".to_string(),
            "--api-socket".into(),
            sock.display().to_string(),
            "--out".into(),
            target.display().to_string(),
        ];
        if !mode.is_empty() {
            args.push(mode.into());
        }
        let (status, out, err) = run_to_end_settled(&args, Duration::from_secs(60));
        assert!(!status.success(), "{args:?} succeeded: {out:?}");
        let text = err.join("\n");
        assert!(!text.contains("panicked"), "{args:?} panicked: {text}");
        assert_eq!(
            err.len(),
            1,
            "{args:?}: expected a one-line error, got {err:?}"
        );
        assert!(
            text.contains("exist"),
            "{args:?}: {text:?} does not say it exists"
        );
    }
    // Nothing was touched.
    assert!(
        std::fs::read_dir(&empty).expect("empty").next().is_none(),
        "empty dir was filled"
    );
    assert_eq!(std::fs::read(&file).expect("file"), b"keep me");
    assert_eq!(
        std::fs::read(full.join("manifest.json")).expect("manifest"),
        full_manifest
    );
    // No temporary directory is left behind, and the guest still runs.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("scratch")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "leftover temporaries: {leftovers:?}");
    let from = vm.line_count();
    vm.wait_pass(from, 0, Duration::from_secs(10))
        .unwrap_or_else(|| panic!("guest stopped\n{}", vm.dump()));
    let (code, info) = api_json(&sock, "GET", "/vm", None);
    assert_eq!(
        (code, info["state"].as_str()),
        (200, Some("running")),
        "{info}"
    );
}
