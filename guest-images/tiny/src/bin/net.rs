//! The net guest: a polling virtio-net driver in CPL3 that echoes request frames from the host
//! and sends a heartbeat frame with a counter kept in its memory. `arkvm.mode=hostile` first
//! posts broken descriptor chains and checks that the device asks for a reset each time.
//!
//! Frames use EtherType 0x88b5 (local experimental). Payload after the Ethernet header:
//! `"ARKN"`, kind (1 request, 2 reply, 3 heartbeat), a pad byte, a little-endian u64 counter
//! (in a reply: the requests answered so far, this one included; in a heartbeat: the
//! heartbeat number), then the request's own bytes, echoed unchanged.
#![no_std]
#![no_main]

use arkvm_tiny_guests::blk::{Desc, DESC_NEXT, DESC_WRITE};
use arkvm_tiny_guests::cmdline::Cmdline;
use arkvm_tiny_guests::net::{rx_buf_addr, tx_buf_addr, Net, BUF, DEVICE_ID_NET};
use arkvm_tiny_guests::status::{self, Field};
use arkvm_tiny_guests::virtio_mmio::{find_devices, Mmio};
use arkvm_tiny_guests::{bootparams, fault, gprintln, tsc};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

const ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const MAGIC: &[u8; 4] = b"ARKN";
const KIND_REQUEST: u8 = 1;
const KIND_REPLY: u8 = 2;
const KIND_HEARTBEAT: u8 = 3;
/// Offset of the counter in a frame.
const COUNTER: usize = 20;

/// Requests answered (kept in guest memory, so snapshots carry it).
static mut ANSWERED: u64 = 0;
/// Heartbeats sent.
static mut HEARTBEATS: u64 = 0;

fn bump(p: *mut u64) -> u64 {
    // SAFETY: single-threaded guest; `p` points at one of the statics above.
    unsafe {
        let v = read_volatile(p) + 1;
        write_volatile(p, v);
        v
    }
}

fn open(mmio: Mmio, post_rx: bool) -> Net {
    match Net::init(mmio, post_rx) {
        Ok(n) => n,
        Err(e) => {
            gprintln!("NETGUEST INIT-FAILED: {e}");
            fault()
        }
    }
}

fn send_blocking(net: &mut Net, frame: &[u8]) {
    while !net.send(frame) {
        net.flush();
        if net.needs_reset() {
            return;
        }
        core::hint::spin_loop();
    }
}

fn echo(mmio: Mmio, hb_ms: u64) -> ! {
    let mut net = open(mmio, true);
    let m = net.mac();
    gprintln!(
        "NETGUEST READY mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5]
    );
    let hb_ticks = tsc::khz().0.saturating_mul(hb_ms).max(1);
    let mut last_hb = tsc::rdtsc();
    let mut buf = [0u8; BUF];
    let mut hb = [0u8; 64];
    hb[..6].fill(0xff);
    hb[6..12].copy_from_slice(&m);
    hb[12..14].copy_from_slice(&ETHERTYPE);
    hb[14..18].copy_from_slice(MAGIC);
    hb[18] = KIND_HEARTBEAT;
    loop {
        while let Some(n) = net.recv(&mut buf) {
            if n < 36
                || buf[12..14] != ETHERTYPE
                || &buf[14..18] != MAGIC
                || buf[18] != KIND_REQUEST
            {
                continue;
            }
            let mut src = [0u8; 6];
            src.copy_from_slice(&buf[6..12]);
            buf.copy_within(0..6, 6);
            buf[..6].copy_from_slice(&src);
            buf[6..12].copy_from_slice(&m);
            buf[18] = KIND_REPLY;
            let count = bump(addr_of_mut!(ANSWERED));
            buf[COUNTER..COUNTER + 8].copy_from_slice(&count.to_le_bytes());
            send_blocking(&mut net, &buf[..n]);
        }
        net.flush();
        let now = tsc::rdtsc();
        if now.wrapping_sub(last_hb) >= hb_ticks {
            last_hb = now;
            let h = bump(addr_of_mut!(HEARTBEATS));
            hb[COUNTER..COUNTER + 8].copy_from_slice(&h.to_le_bytes());
            // SAFETY: single-threaded guest; a volatile read of the static.
            let answered = unsafe { read_volatile(addr_of!(ANSWERED)) };
            hb[28..36].copy_from_slice(&answered.to_le_bytes());
            let _ = net.send(&hb);
            net.flush();
        }
        if net.needs_reset() {
            gprintln!("NETGUEST NEEDS-RESET");
            net = open(mmio, true);
        }
    }
}

/// Posts each broken chain on a fresh device and checks the device asks for a reset.
fn hostile(mmio: Mmio) {
    let far = 0x7_0000_0000u64;
    let rd = |addr, len| Desc {
        addr,
        len,
        flags: 0,
        next: 0,
    };
    let wr = |addr, len| Desc {
        addr,
        len,
        flags: DESC_WRITE,
        next: 0,
    };
    let looped = |flags| {
        [
            Desc {
                addr: tx_buf_addr(0),
                len: 64,
                flags: flags | DESC_NEXT,
                next: 1,
            },
            Desc {
                addr: tx_buf_addr(1),
                len: 64,
                flags: flags | DESC_NEXT,
                next: 0,
            },
        ]
    };
    // (name, queue, chain, raw)
    let cases: [(&str, usize, &[Desc], bool); 9] = [
        ("tx-loop", 1, &looped(0), true),
        ("tx-out-of-range", 1, &[rd(far, 64)], false),
        ("tx-zero-length", 1, &[rd(tx_buf_addr(0), 0)], false),
        ("tx-huge-length", 1, &[rd(tx_buf_addr(0), u32::MAX)], false),
        (
            "tx-oversized-frame",
            1,
            &[rd(rx_buf_addr(0), 40_000), rd(rx_buf_addr(0), 40_000)],
            false,
        ),
        ("tx-device-writable", 1, &[wr(tx_buf_addr(0), 64)], false),
        ("rx-small-buffer", 0, &[wr(rx_buf_addr(0), 64)], false),
        ("rx-out-of-range", 0, &[wr(far, BUF as u32)], false),
        ("rx-loop", 0, &looped(DESC_WRITE), true),
    ];
    let khz = tsc::khz().0;
    let mut detected = 0;
    for (name, q, chain, raw) in cases {
        let mut net = open(mmio, false);
        net.post_raw(q, chain, raw);
        let start = tsc::rdtsc();
        let mut ok = false;
        // RX cases need a frame from the host, which the test sends every few milliseconds.
        while tsc::rdtsc().wrapping_sub(start) < khz.saturating_mul(20_000) {
            if net.needs_reset() {
                ok = true;
                break;
            }
            core::hint::spin_loop();
        }
        if ok {
            detected += 1;
        }
        gprintln!("HOSTILE {name} needs_reset={}", ok as u8);
    }
    gprintln!("HOSTILE DONE detected={detected}/{}", cases.len());
}

/// Entered in CPL3 by the prologue.
#[no_mangle]
extern "C" fn guest_main(boot_params: u64) -> ! {
    status::set(Field::Magic, status::STATUS_MAGIC);
    let (_, text) = bootparams::from_guest(boot_params);
    let c = Cmdline::new(text);
    let mode = c.get("arkvm.mode").unwrap_or("echo");
    let hb_ms = c.get_u64("arkvm.hb_ms").unwrap_or(100);
    let (devs, n) = find_devices(DEVICE_ID_NET);
    gprintln!("NETGUEST mode={mode} nets={n}");
    if n == 0 {
        gprintln!("NETGUEST no virtio-net device");
        fault();
    }
    if mode == "hostile" {
        hostile(devs[0]);
    }
    echo(devs[0], hb_ms)
}
