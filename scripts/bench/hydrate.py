#!/usr/bin/env python3
"""Instant disks (issue 11): restore of a disk guest's backup point, 64 MiB and 512 MiB disks.

The disk guest (`arkvm.mode=numbered`, a 16 MiB ring) runs on a disk whose part past the ring is
random (incompressible) data, is backed up once into a fresh repository, and shut down. The
point is restored three times per size with `arkvm restore --repo R --id ID --disk-dir D`.
Measured from outside, perf_counter just before Popen:
- first output: the restored guest's first DISKGEN line on stdout (new console output);
- hydrated: `disk_hydration.elapsed_ms` from `GET /vm` once `done` (every disk local);
and `dd if=/dev/zero bs=1M conv=fsync` of the same bytes into the same directory as the
physical baseline. Headline: first output at 512 MiB over 64 MiB (the goal: flat, about 1).

    python3 scripts/bench/hydrate.py        # ARKVM_BIN, ARKVM_BENCH_DIR as for scripts/bench/run
"""

import json
import os
import socket
import subprocess
import time

import benchlib as B

SIZES = [64, 512]
RUNS = 3
RING_MIB = 16


def get_vm(sock):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sock)
    s.sendall(b"GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def make_point(arkvm, scratch, mib):
    repo = os.path.join(scratch, f"repo-{mib}")
    subprocess.run([arkvm, "backup", "init", "--repo", repo], check=True,
                   stdout=subprocess.DEVNULL)
    disk = os.path.join(scratch, f"disk-{mib}.img")
    with open(disk, "wb") as f:
        f.write(bytes(RING_MIB << 20))
        left = (mib - RING_MIB) << 20
        while left > 0:
            n = min(left, 8 << 20)
            f.write(os.urandom(n))
            left -= n
    sock = os.path.join(scratch, f"src-{mib}.sock")
    vm = B.Proc([arkvm, "run", "--kernel", B.guest("disk"), "--memory", "64M", "--name", "hb",
                 "--api-socket", sock, "--disk", disk,
                 "--cmdline", f"arkvm.mode=numbered arkvm.blocks={RING_MIB * 256}"])
    if vm.wait_line(r"^DISKGEN ", timeout=120) is None:
        B.die(f"the disk guest does not run: {vm.stderr_text()[-300:]}")
    r = subprocess.run([arkvm, "snapshot", "--api-socket", sock, "--repo", repo, "--json"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    vm.stop(arkvm, sock)
    os.unlink(disk)
    point = json.loads(r.stdout.strip().splitlines()[-1])["id"]
    return repo, point


def one_restore(arkvm, scratch, repo, point, tag):
    sock = os.path.join(scratch, f"r-{tag}.sock")
    disks = os.path.join(scratch, f"disks-{tag}")
    vm = B.Proc([arkvm, "restore", "--repo", repo, "--id", point, "--disk-dir", disks,
                 "--api-socket", sock])
    i = vm.wait_line(r"^DISKGEN ", timeout=300)
    first = vm.lines()[i][0] - vm.t0 if i is not None else None
    hydrated = None
    deadline = time.time() + 600
    while time.time() < deadline and os.path.exists(sock):
        h = get_vm(sock).get("disk_hydration") or {}
        if h.get("error"):
            B.die(f"hydration failed: {h['error']}")
        if h.get("done"):
            hydrated = h["elapsed_ms"] / 1000.0
            break
        time.sleep(0.1)
    vm.stop(arkvm, sock)
    B.drop_dir(disks)
    return first, hydrated


def main():
    arkvm = os.environ.get("ARKVM_BIN", "target/release/arkvm")
    scratch = os.path.join(os.environ.get("ARKVM_BENCH_DIR", "/var/tmp/arkvm-bench"), "hydrate")
    B.drop_dir(scratch)
    os.makedirs(scratch)
    print(f"load average at start: {os.getloadavg()}")
    rows, firsts = [], {}
    for mib in SIZES:
        repo, point = make_point(arkvm, scratch, mib)
        res = [one_restore(arkvm, scratch, repo, point, f"{mib}-{k}") for k in range(RUNS)]
        dd, dd_argv = B.dd_write(os.path.join(scratch, "dd.img"), mib)
        f = [r[0] for r in res]
        h = [r[1] for r in res]
        firsts[mib] = B.stats(f)[0] if B.stats(f) else None
        med_h = B.stats(h)[0] if B.stats(h) else None
        rate = (mib / med_h) if med_h else None
        rows.append([f"{mib} MiB", B.fmt_stats(f, 1000, 0), B.fmt_stats(h, 1000, 0),
                     B.fmt(rate, 0, " MiB/s"), B.fmt(dd / 1048576, 0, " MiB/s"),
                     B.fmt(rate / (dd / 1048576) if rate else None, 2)])
        B.drop_dir(repo)
    B.table(["disk", "first output ms (median [min-max])", "hydrated ms", "hydrate rate",
                   "dd write", "hydrate / dd"], rows)
    if firsts.get(64) and firsts.get(512):
        print(f"first output, 512 MiB / 64 MiB: {firsts[512] / firsts[64]:.2f}")
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
