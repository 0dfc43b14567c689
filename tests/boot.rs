//! Booting the tiny guests, and every kind of bad start-up input.

use std::time::Duration;

use arkvm_tests::{require_kvm, run_to_end, tiny_guest, ScratchDir, Vmm};

#[test]
fn marker_guest_boots_and_exits_zero() {
    require_kvm();
    let kernel = tiny_guest("marker");
    let (status, out, err) = run_to_end(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
        ],
        Duration::from_secs(30),
    );
    assert!(status.success(), "status {status:?}, stderr: {err:?}");
    assert!(
        out.iter().any(|l| l.contains("ARKVM-MARKER-OK")),
        "no marker in {out:?}"
    );
}

#[test]
fn memory_guest_runs_100_passes_without_torn() {
    require_kvm();
    let kernel = tiny_guest("memory");
    let (status, out, err) = run_to_end(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64M",
            "--cmdline",
            "arkvm.passes=150",
        ],
        Duration::from_secs(120),
    );
    assert!(
        status.success(),
        "status {status:?}, stderr: {err:?}, out: {out:?}"
    );
    assert!(!out.iter().any(|l| l.contains("TORN")), "TORN in {out:?}");
    assert!(
        out.iter().any(|l| l.contains("DONE passes=150")),
        "guest did not finish 150 passes: {out:?}"
    );
}

#[test]
fn memory_guest_uses_memory_above_4g() {
    require_kvm();
    // 3.5 GiB puts half a GiB above the MMIO hole; the guest checks every page it writes.
    let kernel = tiny_guest("memory");
    let (status, out, err) = run_to_end(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "3584M",
            "--cmdline",
            "arkvm.passes=2",
        ],
        Duration::from_secs(120),
    );
    assert!(
        status.success(),
        "status {status:?}, stderr: {err:?}, out: {out:?}"
    );
    assert!(!out.iter().any(|l| l.contains("TORN")), "TORN in {out:?}");
    assert!(out.iter().any(|l| l.contains("DONE passes=2")), "{out:?}");
}

/// Runs arkvm expecting a start-up error: non-zero status, one line on stderr that contains
/// `needle`, and no panic.
fn expect_error(args: &[&str], needle: &str) {
    let (status, out, err) = run_to_end(args, Duration::from_secs(30));
    assert!(!status.success(), "{args:?} succeeded: {out:?}");
    let text = err.join("\n");
    assert!(!text.contains("panicked"), "{args:?} panicked: {text}");
    assert!(
        !text.contains("backtrace"),
        "{args:?} printed a backtrace: {text}"
    );
    assert_eq!(err.len(), 1, "{args:?}: expected one line, got {err:?}");
    assert!(
        text.to_lowercase().contains(&needle.to_lowercase()),
        "{args:?}: '{text}' does not mention '{needle}'"
    );
}

#[test]
fn bad_input_gives_one_line_errors() {
    require_kvm();
    let dir = ScratchDir::new("badinput");
    let marker = tiny_guest("marker");
    let marker = marker.to_str().unwrap();
    let junk = dir.path().join("junk.bin");
    std::fs::write(&junk, vec![0x5au8; 65536]).unwrap();
    let junk = junk.to_str().unwrap();
    let missing = dir.path().join("nope");
    let missing = missing.to_str().unwrap();

    expect_error(&["run", "--kernel", missing], "cannot open kernel");
    expect_error(
        &["run", "--kernel", junk],
        "neither an ELF vmlinux nor a bzImage",
    );
    // The marker is linked at 2 MiB, so 2 MiB of memory cannot hold it.
    expect_error(
        &["run", "--kernel", marker, "--memory", "2M"],
        "does not fit",
    );
    expect_error(&["run", "--kernel", marker, "--memory", "0"], "--memory");
    expect_error(
        &["run", "--kernel", marker, "--memory", "1000T"],
        "more than KVM can map",
    );
    expect_error(
        &["run", "--kernel", marker, "--memory", "lots"],
        "invalid memory size",
    );
    expect_error(&["run", "--kernel", marker, "--vcpus", "0"], "--vcpus");
    expect_error(&["run", "--kernel", marker, "--vcpus", "300"], "--vcpus");
    // A directory cannot be read as an initrd.
    expect_error(
        &[
            "run",
            "--kernel",
            marker,
            "--initrd",
            dir.path().to_str().unwrap(),
        ],
        "cannot read initrd",
    );
    expect_error(
        &["run", "--kernel", marker, "--initrd", missing],
        "cannot read initrd",
    );
}

#[test]
fn smp_vcpus_start_and_the_guest_runs() {
    require_kvm();
    let kernel = tiny_guest("marker");
    let mut vmm = Vmm::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--vcpus",
        "4",
        "--log-level",
        "info",
    ]);
    let status = vmm.wait_exit(Duration::from_secs(30)).expect("exit");
    assert!(status.success(), "{}", vmm.dump());
    assert!(
        vmm.stderr()
            .iter()
            .any(|l| l.contains("guest running with 4 vCPUs")),
        "{}",
        vmm.dump()
    );
}

/// Assembles a 64-bit guest linked at 2 MiB from GNU as source (binutils is a build dependency).
fn assemble_guest(dir: &ScratchDir, name: &str, body: &str) -> std::path::PathBuf {
    let src = dir.path().join(format!("{name}.S"));
    let obj = dir.path().join(format!("{name}.o"));
    let elf = dir.path().join(format!("{name}.elf"));
    std::fs::write(
        &src,
        format!(".globl _start\n.text\n.code64\n_start:\n{body}\n"),
    )
    .unwrap();
    let ok = std::process::Command::new("as")
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .status()
        .expect("run as")
        .success()
        && std::process::Command::new("ld")
            .args(["-static", "-nostdlib", "-Ttext=0x200000", "-o"])
            .arg(&elf)
            .arg(&obj)
            .status()
            .expect("run ld")
            .success();
    assert!(ok, "cannot assemble {name}");
    elf
}

#[test]
fn triple_fault_exits_nonzero_with_a_reason() {
    require_kvm();
    let dir = ScratchDir::new("triplefault");
    // An empty IDT and an invalid opcode: #UD cannot be delivered, which escalates to a
    // triple fault.
    let elf = assemble_guest(&dir, "tf", "lidt idtr\nud2\nidtr: .word 0\n.quad 0");
    let (status, _out, err) = run_to_end(
        &["run", "--kernel", elf.to_str().unwrap(), "--memory", "16M"],
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(4), "guest crash status: {err:?}");
    assert_eq!(err.len(), 1, "{err:?}");
    assert!(err[0].contains("triple-faulted"), "{err:?}");
}

#[test]
fn unemulated_instruction_exits_nonzero_with_its_bytes() {
    require_kvm();
    let dir = ScratchDir::new("int3");
    // int3 in ring 0 with no IDT: on this machine's software-nested KVM the instruction is not
    // emulated (KVM_EXIT_INTERNAL_ERROR); on hardware KVM it triple-faults. Either way arkvm
    // must stop with a non-zero status and a one-line reason.
    let elf = assemble_guest(&dir, "int3", "lidt idtr\nint3\nidtr: .word 0\n.quad 0");
    let (status, _out, err) = run_to_end(
        &["run", "--kernel", elf.to_str().unwrap(), "--memory", "16M"],
        Duration::from_secs(30),
    );
    assert_eq!(status.code(), Some(4), "guest crash status: {err:?}");
    assert_eq!(err.len(), 1, "{err:?}");
    let line = &err[0];
    assert!(
        line.contains("triple-faulted") || line.contains("instruction bytes: cc"),
        "{line}"
    );
}

#[test]
fn smp_vcpu_threads_pause_and_resume_through_the_state_machine() {
    require_kvm();
    let dir = ScratchDir::new("smp-pause");
    let sock = dir.path().join("vm.sock");
    let vmm = arkvm_tests::start_memory_guest(&sock, "128M", 4, "");
    assert!(
        vmm.wait_line("PASS", Duration::from_secs(30)).is_some(),
        "{}",
        vmm.dump()
    );
    let (code, info) = arkvm_tests::api_json(&sock, "GET", "/vm", None);
    assert_eq!(code, 200);
    assert_eq!(info["config"]["vcpus"], 4);
    assert_eq!(info["state"], "running");
    // A pause answers only once every one of the four vCPU threads has answered Paused.
    let (code, _) = arkvm_tests::api_json(&sock, "PUT", "/vm/pause", None);
    assert_eq!(code, 204, "{}", vmm.dump());
    let (_, info) = arkvm_tests::api_json(&sock, "GET", "/vm", None);
    assert_eq!(info["state"], "paused");
    let lines = vmm.stdout().len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vmm.stdout().len(), lines, "the guest ran while paused");
    let (code, _) = arkvm_tests::api_json(&sock, "PUT", "/vm/resume", None);
    assert_eq!(code, 204);
    assert!(
        vmm.wait_line_from(lines, Duration::from_secs(30), |l| l.starts_with("PASS"))
            .is_some(),
        "the guest did not resume\n{}",
        vmm.dump()
    );
    let (code, _) = arkvm_tests::api_json(&sock, "PUT", "/vm/shutdown", None);
    assert_eq!(code, 204);
}
