#!/usr/bin/env python3
"""Disk benchmark (issue 3): virtio-blk throughput from the tiny disk guest against the host.

The disk guest (`arkvm.mode=bench`, a polling CPL3 virtio-blk driver with up to 16 requests in
flight) runs four phases on one raw image: sequential 64 KiB writes and reads over the whole
disk, then random 4 KiB writes and reads (as many as the disk has 4 KiB blocks). Each phase is
timed on the host between its BENCH-BEGIN and BENCH-END lines. The baselines, run on the same
file in the same run and alternated with the guest runs:
- host buffered I/O, what arkvm's device does (`dd` for the sequential phases, pwrite/pread of
  4 KiB at random offsets from python for the random ones);
- host O_DIRECT (`dd oflag=direct`/`iflag=direct`, and pwritev/preadv with O_DIRECT), the
  device's physical limit.
The CPU time of each arkvm thread during each phase shows what limits the guest.
"""

import mmap
import os
import subprocess
import sys
import time

import benchlib as B

HZ = os.sysconf("SC_CLK_TCK")
PHASES = ["seqwrite", "seqread", "randwrite", "randread"]


def thread_cpu(pid):
    """{thread name: utime+stime seconds} for every thread of `pid`."""
    res = {}
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
            name = st[st.index("(") + 1:st.rindex(")")]
            fields = st[st.rindex(")") + 2:].split()
            cpu = (int(fields[11]) + int(fields[12])) / HZ
            res[name] = res.get(name, 0.0) + cpu
    except (OSError, ValueError):
        pass
    return res


def xorshift_offsets(count, blocks, seed=0x9E3779B97F4A7C15):
    x = seed
    offs = []
    for _ in range(count):
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        offs.append((x % blocks) * 4096)
    return offs


def timed(argv):
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def host_random(path, offs, write, direct):
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    buf.write(b"\x5a" * 4096)
    try:
        t0 = time.perf_counter()
        if write:
            for o in offs:
                os.pwritev(fd, [buf], o)
        else:
            for o in offs:
                os.preadv(fd, [buf], o)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def host_baseline(path, size, ops):
    """{phase: (buffered bytes/s, O_DIRECT bytes/s)} and the commands used."""
    n64 = size // 65536
    cmds = {
        "seqwrite": ["dd", "if=/dev/zero", f"of={path}", "bs=64K", f"count={n64}",
                     "conv=notrunc"],
        "seqread": ["dd", f"if={path}", "of=/dev/null", "bs=64K"],
    }
    res = {}
    for ph, argv in cmds.items():
        flag = "oflag=direct" if ph == "seqwrite" else "iflag=direct"
        res[ph] = (size / timed(argv), size / timed(argv + [flag]))
    offs = xorshift_offsets(ops, size // 4096)
    direct_offs = offs[:max(1, ops // 8)]  # O_DIRECT random I/O is slow; a sample will do
    for ph, write in (("randwrite", True), ("randread", False)):
        buffered = len(offs) * 4096 / host_random(path, offs, write, False)
        direct = len(direct_offs) * 4096 / host_random(path, direct_offs, write, True)
        res[ph] = (buffered, direct)
    subprocess.run(["sync"], check=False)
    cmds["randwrite"] = ["python3: os.pwritev 4 KiB at xorshift offsets (O_DIRECT: 1/8 of them)"]
    cmds["randread"] = ["python3: os.preadv 4 KiB at xorshift offsets (O_DIRECT: 1/8 of them)"]
    return res, cmds


def guest_run(s, path):
    argv = [s.arkvm, "--log-level", "info", "run", "--kernel", B.guest("disk"), "--memory",
            "256M", "--disk", path, "--cmdline", "arkvm.mode=bench"]
    marks = {}
    p = B.Proc(argv)

    # Sample per-thread CPU as each phase starts and ends (the reader thread sees the lines).
    idx = 0
    phases = {}
    while True:
        i = p.wait_line(r"^BENCH-(BEGIN|END|DONE)", start=idx, timeout=300)
        if i is None:
            break
        t, _, line = p.out[i]
        marks[line.split()[0] + " " + (line.split()[1] if len(line.split()) > 1 else "")] = (
            t, thread_cpu(p.p.pid))
        idx = i + 1
        if line.startswith("BENCH-DONE"):
            break
    lost = p.lost()
    status = p.stop()
    info = {}
    for _, _, line in p.lines("out"):
        w = line.split()
        if w and w[0] == "BENCH-INFO":
            kv = dict(x.split("=", 1) for x in w[2:])
            info[w[1]] = kv
        if w and w[0] == "BENCH-SETUP":
            info["setup"] = dict(x.split("=", 1) for x in w[1:])
    for ph in PHASES:
        b, e = marks.get(f"BENCH-BEGIN {ph}"), marks.get(f"BENCH-END {ph}")
        if not b or not e:
            continue
        cpu = {k: e[1].get(k, 0.0) - b[1].get(k, 0.0) for k in e[1]}
        errors = int(info.get(ph, {}).get("errors", "-1"))
        tsc = int(info.get(ph, {}).get("tsc_cycles", "0"))
        khz = int(info.get("setup", {}).get("tsc_khz", "0"))
        phases[ph] = {"secs": e[0] - b[0], "cpu": cpu, "errors": errors,
                      "ops": int(info.get(ph, {}).get("ops", "0")),
                      "guest_secs": tsc / (khz * 1e3) if khz else None}
    ok = status == 0 and len(phases) == len(PHASES) and all(
        v["errors"] == 0 for v in phases.values())
    if not ok and lost and "shutdown requested" in lost:
        raise B.GuestLost(f"disk guest: {lost}")
    if not ok:
        print(f"  disk guest failed (status {status}):")
        print("\n".join(line for _, _, line in p.lines("out")[-10:]))
        print(p.stderr_text()[-800:])
    return argv, phases, ok


def main():
    quick = B.quick_flag(sys.argv)
    mib = 64 if quick else 256
    rounds = 1 if quick else 2
    size = mib << 20
    with B.Scratch("disk") as s:
        B.heading(f"disk: virtio-blk from the tiny disk guest vs the host, {mib} MiB image")
        B.print_facts(B.machine_facts(s.dir), s)
        img = s.path("disk.img")
        subprocess.run(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={mib}",
                        "conv=fsync"], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        host, guest = [], []
        for _ in range(rounds):
            h, cmds = host_baseline(img, size, size // 4096)
            host.append(h)
            argv, g, ok = B.retry(guest_run, s, img)
            if not ok:
                B.die("the disk guest did not complete its phases")
            guest.append(g)
        B.show_command(argv)
        B.show_command(["dd", "if=/dev/zero", f"of={img}", "bs=1M", f"count={mib}",
                        "conv=fsync", "  (image, once)"])
        for ph in PHASES:
            B.show_command(cmds[ph] + ([" (and with oflag=direct / iflag=direct)"]
                                       if ph.startswith("seq") else []))
        B.note(f"{rounds} rounds, host and guest alternated; median of the rounds")
        print()
        rows = []
        for ph in PHASES:
            g = [r[ph] for r in guest]
            gbps = B.stats([size / r["secs"] if ph.startswith("seq")
                            else r["ops"] * 4096 / r["secs"] for r in g])[0]
            hb = B.stats([h[ph][0] for h in host])[0]
            hd = B.stats([h[ph][1] for h in host])[0]
            bs = 65536 if ph.startswith("seq") else 4096
            cpu = {}
            for r in g:
                for k, v in r["cpu"].items():
                    cpu.setdefault(k, []).append(v / r["secs"])
            busy = ", ".join(f"{k} {B.stats(v)[0] * 100:.0f}%" for k, v in sorted(cpu.items())
                             if B.stats(v)[0] >= 0.05)
            rows.append([ph, f"{bs // 1024}K", f"{gbps / 1e6:.0f}", f"{gbps / bs / 1e3:.1f}",
                         f"{hb / 1e6:.0f}", f"{hd / 1e6:.0f}",
                         f"{gbps / hb:.2f}x", f"{gbps / hd:.2f}x", busy])
        B.table(["phase", "bs", "guest MB/s", "guest kIOPS", "host buffered MB/s",
                 "host O_DIRECT MB/s", "vs buffered", "vs O_DIRECT", "arkvm threads busy"],
                rows)
        print()
        B.note("guest MB/s: bytes / host time between BENCH-BEGIN and BENCH-END; threads "
               "busy: CPU time (user+sys) of each arkvm thread over the phase's wall time")


if __name__ == "__main__":
    main()
