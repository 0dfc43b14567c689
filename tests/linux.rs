//! The slow tests: a real Linux 6.1 kernel through the 64-bit boot protocol. Guest ring-0 code
//! is emulated on this machine, so each of these takes a minute or more.

use std::time::Duration;

use arkvm_tests::{linux_file, require_kvm, ScratchDir, Vmm};

const CMDLINE: &str = "console=ttyS0 noxsave clearcpuid=308,151 panic=-1";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

fn disk_copy(dir: &ScratchDir) -> String {
    let img = dir.path().join("disk.img");
    std::fs::copy(linux_file("disk-ext4.img"), &img).expect("copy the disk image");
    let mut perm = std::fs::metadata(&img).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
    std::fs::set_permissions(&img, perm).unwrap();
    img.to_str().unwrap().to_string()
}

#[test]
fn linux_boots_to_init_and_finds_its_disk() {
    require_kvm();
    let dir = ScratchDir::new("linux-boot");
    let disk = disk_copy(&dir);
    let kernel = linux_file("vmlinux");
    let initrd = linux_file("initramfs-mini.cpio");
    let vmm = Vmm::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "256M",
        "--disk",
        &disk,
        "--cmdline",
        CMDLINE,
    ]);
    assert!(
        vmm.wait_line("Run /init as init process", BOOT_TIMEOUT)
            .is_some(),
        "Linux did not reach /init\n{}",
        vmm.dump()
    );
    let out = vmm.stdout();
    assert!(
        out.iter()
            .any(|l| l.contains("virtio_blk") && l.contains("[vda]")),
        "Linux did not find the disk\n{}",
        vmm.dump()
    );
}

#[test]
fn linux_sees_four_processors_from_the_mp_table() {
    require_kvm();
    let kernel = linux_file("vmlinux");
    let vmm = Vmm::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "256M",
        "--vcpus",
        "4",
        "--cmdline",
        CMDLINE,
    ]);
    assert!(
        vmm.wait_line("smpboot: Allowing 4 CPUs", BOOT_TIMEOUT)
            .is_some(),
        "{}",
        vmm.dump()
    );
    let out = vmm.stdout();
    for n in 0..4 {
        assert!(
            out.iter().any(|l| l.contains(&format!("Processor #{n}"))),
            "MP table processor {n} missing\n{}",
            vmm.dump()
        );
    }
    assert!(
        out.iter().any(|l| l.contains("Processors: 4")),
        "{}",
        vmm.dump()
    );
}

#[test]
fn linux_snapshotted_mid_boot_continues_to_init() {
    require_kvm();
    let dir = ScratchDir::new("linux-snap");
    let disk = disk_copy(&dir);
    let sock = dir.path().join("vm.sock");
    let sock = sock.to_str().unwrap();
    let snap = dir.path().join("snap");
    let kernel = linux_file("vmlinux");
    let initrd = linux_file("initramfs-mini.cpio");
    let mut vmm = Vmm::spawn(&[
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "256M",
        "--disk",
        &disk,
        "--api-socket",
        sock,
        "--cmdline",
        CMDLINE,
    ]);
    // Well into the boot, before userspace.
    assert!(
        vmm.wait_line("Memory:", BOOT_TIMEOUT).is_some(),
        "{}",
        vmm.dump()
    );
    let seen_before = vmm.stdout().len();
    let status = std::process::Command::new(arkvm_tests::arkvm_bin())
        .args([
            "snapshot",
            "--api-socket",
            sock,
            "--out",
            snap.to_str().unwrap(),
            "--paused",
        ])
        .status()
        .expect("run arkvm snapshot");
    assert!(status.success(), "snapshot failed\n{}", vmm.dump());
    vmm.kill();
    let last_line = vmm.stdout()[seen_before.saturating_sub(1)].clone();

    let restored = Vmm::spawn(&[
        "restore",
        "--from",
        snap.to_str().unwrap(),
        "--disk-dir",
        dir.path().join("restored-disks").to_str().unwrap(),
    ]);
    assert!(
        restored
            .wait_line("Run /init as init process", BOOT_TIMEOUT)
            .is_some(),
        "the restored kernel did not reach /init (snapshot taken after: {last_line})\n{}",
        restored.dump()
    );
    // The restored kernel continues: it does not print its early boot again.
    assert!(
        !restored
            .stdout()
            .iter()
            .any(|l| l.contains("Linux version")),
        "the restored guest rebooted instead of continuing\n{}",
        restored.dump()
    );
}
