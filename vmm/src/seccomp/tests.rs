use super::*;

#[test]
fn every_listed_name_is_a_system_call_and_every_kind_builds() {
    for kind in ThreadKind::ALL {
        build(kind).unwrap();
    }
    assert_eq!(syscall_number("read"), Some(0));
    assert_eq!(syscall_name(libc::SYS_ioctl), Some("ioctl"));
    assert_eq!(syscall_number("no_such_call"), None);
}

#[test]
fn a_parent_allows_what_the_kinds_it_starts_allow() {
    for kind in ThreadKind::ALL {
        let own = allowed(kind);
        for child in kind.starts() {
            assert!(allowed(*child).is_subset(&own), "{kind:?} starts {child:?}");
        }
    }
    // The narrow kinds stay narrow.
    assert!(!allowed(ThreadKind::Vcpu).contains("socket"));
    // The API may open (see THREAD_EXIT in kinds.rs), but not change files.
    assert!(!allowed(ThreadKind::Api).contains("unlinkat"));
    assert!(!allowed(ThreadKind::Api).contains("ftruncate"));
    assert!(!allowed(ThreadKind::Main).contains("execve"));
}

#[test]
fn the_message_names_the_kind_and_the_call() {
    let mut buf = [0u8; 320];
    let len = sigsys::message(Some(ThreadKind::Vcpu), libc::SYS_socket, &mut buf);
    let text = std::str::from_utf8(&buf[..len]).unwrap();
    assert!(
        text.starts_with(
            "arkvm: error: seccomp: the vcpu thread made the system call socket (number 41)"
        ),
        "{text}"
    );
    assert!(text.ends_with("(docs/seccomp.md)\n"), "{text}");
}

const CHILD: &str = "ARKVM_SECCOMP_TRAP_CHILD";

/// Runs in a child test process: filters this thread as a vCPU, then makes a denied call.
#[test]
fn trap_child() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    prepare(SeccompMode::On).unwrap();
    enter(ThreadKind::Vcpu);
    // SAFETY: a plain system call; the filter denies it and the handler ends the process.
    unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    unreachable!("the denied call returned");
}

#[test]
fn a_denied_call_ends_the_process_with_a_line_naming_it() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "seccomp::tests::trap_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(sigsys::DENIED_EXIT), "{stderr}");
    assert!(
        stderr.contains("seccomp: the vcpu thread made the system call socket (number 41)"),
        "{stderr}"
    );
}
