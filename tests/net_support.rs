//! Shared by the network tests: a network namespace with a tap (deleted on drop), arkvm
//! started inside it, and a raw AF_PACKET socket on the tap that talks the net guest's echo
//! protocol (see guest-images/tiny/src/bin/net.rs).

#![allow(dead_code)]

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use arkvm_tests::{arkvm_bin, tiny_guest, wait_for_path, Vmm};

/// EtherType of the echo protocol (local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
/// The host side's MAC address.
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const KIND_HEARTBEAT: u8 = 3;

/// Runs `ip ARGS`, panicking if it fails.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

/// A network namespace holding taps; deleted (with its taps) on drop, even when the test
/// fails.
pub struct NetNs {
    pub name: String,
    pub taps: Vec<String>,
}

impl NetNs {
    /// A fresh namespace with `taps` tap devices, up. Names are unique per process and call.
    pub fn new(taps: usize) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id());
        let ns = Self {
            name: format!("arkvm-net-{id}"),
            taps: (0..taps).map(|t| format!("akt{id}{t}")).collect(),
        };
        ip(&["netns", "add", &ns.name]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        for t in &ns.taps {
            assert!(t.len() < 16, "tap name {t} too long");
            ip(&["-n", &ns.name, "tuntap", "add", "dev", t, "mode", "tap"]);
            ip(&["-n", &ns.name, "link", "set", t, "up"]);
        }
        ns
    }

    /// Starts `arkvm ARGS` inside the namespace.
    pub fn spawn(&self, args: &[String]) -> Vmm {
        let mut all: Vec<String> = vec!["netns".into(), "exec".into(), self.name.clone()];
        all.push(arkvm_bin().display().to_string());
        all.extend(args.iter().cloned());
        Vmm::spawn_program(Path::new("ip"), &all)
    }

    /// Starts the net guest on tap `tap` with a control socket at `sock`; waits for its
    /// driver to come up. Returns the VM and the guest's MAC.
    pub fn start_guest(
        &self,
        tap: usize,
        sock: &Path,
        cmdline: &str,
        extra: &[&str],
    ) -> (Vmm, [u8; 6]) {
        let mut args: Vec<String> = [
            "run",
            "--kernel",
            tiny_guest("net").to_str().expect("utf-8"),
            "--memory",
            "64M",
            "--api-socket",
            sock.to_str().expect("utf-8"),
            "--cmdline",
            cmdline,
            "--net",
            &format!("tap={},id=net0", self.taps[tap]),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let vmm = self.spawn(&args);
        assert!(
            wait_for_path(sock, Duration::from_secs(30)),
            "no control socket\n{}",
            vmm.dump()
        );
        let mac = wait_ready(&vmm, 0);
        (vmm, mac)
    }

    /// A raw socket on tap `tap`, inside the namespace.
    pub fn socket(&self, tap: usize) -> RawSock {
        let ns = self.name.clone();
        let tap = self.taps[tap].clone();
        // setns changes only the calling thread's namespace: do it in a thread of its own.
        std::thread::spawn(move || RawSock::open_in(&ns, &tap))
            .join()
            .expect("socket thread")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Waits for `NETGUEST READY mac=..` from line `from` on; returns the MAC.
pub fn wait_ready(vmm: &Vmm, from: usize) -> [u8; 6] {
    let (_, line) = vmm
        .wait_line_from(from, Duration::from_secs(120), |l| {
            l.contains("NETGUEST READY")
        })
        .unwrap_or_else(|| panic!("the net guest did not come up\n{}", vmm.dump()));
    let text = line.split("mac=").nth(1).expect("mac in the READY line");
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(text.trim().split(':')) {
        *b = u8::from_str_radix(p, 16).expect("hex");
    }
    mac
}

/// A raw AF_PACKET socket bound to one tap, for the echo protocol's EtherType only.
pub struct RawSock {
    fd: OwnedFd,
    ifindex: i32,
}

/// One reply or heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    Reply { seq: u64, count: u64, intact: bool },
    Heartbeat { n: u64, answered: u64 },
}

fn pattern(seq: u64, i: usize) -> u8 {
    (seq.wrapping_mul(31).wrapping_add(i as u64 * 7) & 0xff) as u8
}

/// The length of request `seq`'s frame (60..=1514 bytes).
pub fn request_len(seq: u64) -> usize {
    60 + (seq.wrapping_mul(2654435761) % 1455) as usize
}

impl RawSock {
    fn open_in(ns: &str, tap: &str) -> Self {
        let nsfd = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("open netns");
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(nsfd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let proto = (ETHERTYPE).to_be() as i32;
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        // SAFETY: fd is a new socket we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = CString::new(tap).expect("tap name");
        // SAFETY: a NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
        assert!(ifindex > 0, "no tap {tap} in {ns}");
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETHERTYPE.to_be();
        sll.sll_ifindex = ifindex;
        // SAFETY: sll is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: a valid timeval for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Self { fd, ifindex }
    }

    /// Sends request `seq` to `mac`.
    pub fn send_request(&self, mac: [u8; 6], seq: u64) {
        let len = request_len(seq);
        let mut f = vec![0u8; len];
        f[..6].copy_from_slice(&mac);
        f[6..12].copy_from_slice(&HOST_MAC);
        f[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        f[14..18].copy_from_slice(b"ARKN");
        f[18] = KIND_REQUEST;
        f[28..36].copy_from_slice(&seq.to_le_bytes());
        for (i, b) in f.iter_mut().enumerate().skip(36) {
            *b = pattern(seq, i);
        }
        self.send_raw(&f);
    }

    /// Sends a raw frame.
    pub fn send_raw(&self, f: &[u8]) {
        // SAFETY: zeroed sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&f[..6]);
        loop {
            // SAFETY: f and sll are valid for the given sizes.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if n == f.len() as isize {
                return;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOBUFS) || e.kind() == std::io::ErrorKind::WouldBlock
            {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            panic!("sendto: {e}");
        }
    }

    /// The next reply or heartbeat, or None after the socket's 50 ms timeout.
    pub fn recv(&self) -> Option<Frame> {
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return None;
            }
            let f = &buf[..n as usize];
            if f.len() < 36 || &f[14..18] != b"ARKN" {
                continue;
            }
            let counter = u64::from_le_bytes(f[20..28].try_into().expect("8"));
            let other = u64::from_le_bytes(f[28..36].try_into().expect("8"));
            match f[18] {
                KIND_REPLY => {
                    let seq = other;
                    let intact = f.len() == request_len(seq)
                        && f[..6] == HOST_MAC
                        && f.iter()
                            .enumerate()
                            .skip(36)
                            .all(|(i, &b)| b == pattern(seq, i));
                    return Some(Frame::Reply {
                        seq,
                        count: counter,
                        intact,
                    });
                }
                KIND_HEARTBEAT => {
                    return Some(Frame::Heartbeat {
                        n: counter,
                        answered: other,
                    })
                }
                _ => continue,
            }
        }
    }
}

/// What an echo run saw.
#[derive(Debug, Default)]
pub struct EchoRun {
    pub replies: u64,
    pub broken: u64,
    pub max_count: u64,
    pub min_count: u64,
    pub last_heartbeat: Option<u64>,
}

/// Sends `n` requests (sequence numbers from `first_seq`) with up to `window` outstanding,
/// resending a request unanswered for 2 s; returns when all are answered or `timeout` passed.
pub fn echo(
    sock: &RawSock,
    mac: [u8; 6],
    first_seq: u64,
    n: u64,
    window: u64,
    timeout: Duration,
) -> EchoRun {
    let deadline = Instant::now() + timeout;
    let mut run = EchoRun {
        min_count: u64::MAX,
        ..Default::default()
    };
    let mut answered = vec![false; n as usize];
    let mut sent_at: Vec<Option<Instant>> = vec![None; n as usize];
    let mut next = 0u64;
    let mut done = 0u64;
    while done < n && Instant::now() < deadline {
        while next < n && next < done + window {
            sock.send_request(mac, first_seq + next);
            sent_at[next as usize] = Some(Instant::now());
            next += 1;
        }
        match sock.recv() {
            Some(Frame::Reply { seq, count, intact }) => {
                let Some(i) = seq.checked_sub(first_seq).filter(|&i| i < n) else {
                    continue;
                };
                if !intact {
                    run.broken += 1;
                }
                if !answered[i as usize] {
                    answered[i as usize] = true;
                    run.replies += 1;
                }
                run.max_count = run.max_count.max(count);
                run.min_count = run.min_count.min(count);
                while done < n && answered[done as usize] {
                    done += 1;
                }
            }
            Some(Frame::Heartbeat { n: h, .. }) => run.last_heartbeat = Some(h),
            None => {
                // Resend what waited too long (a frame lost at a snapshot instant).
                for i in done..next {
                    if !answered[i as usize]
                        && sent_at[i as usize].is_some_and(|t| t.elapsed() > Duration::from_secs(2))
                    {
                        sock.send_request(mac, first_seq + i);
                        sent_at[i as usize] = Some(Instant::now());
                    }
                }
            }
        }
    }
    run
}

/// The next heartbeat's counter (within `timeout`).
pub fn next_heartbeat(sock: &RawSock, timeout: Duration) -> Option<u64> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(Frame::Heartbeat { n, .. }) = sock.recv() {
            return Some(n);
        }
    }
    None
}
