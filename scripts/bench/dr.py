#!/usr/bin/env python3
"""DR benchmark: continuous checkpoints of a 1 GiB memory guest to a receiver on loopback.

    python3 scripts/bench/dr.py [--quick] [--window SECS]

For each dirty rate (about 10 MiB/s, about 100 MiB/s, and the guest unlimited) and each
interval (1 s, 500 ms, 250 ms, 100 ms), it runs `arkvm run --dr-target` against `arkvm dr
serve` and reports: whether the interval was sustained (no interval skipped, no checkpoint
failed), the RPO (GET /dr rpo_ms sampled every 100 ms), bytes and pause per checkpoint, and
the guest's page-write rate as a ratio to the same guest without DR. The write rate is read
from the guest's own memory: every page holds the number of times it was written (its
generation), so the sum over all pages at two instants gives the page writes in between. The
instants are two exported checkpoints, or for the baseline two incremental backups into a
local repository (`arkvm snapshot --repo`, after a first full one), exported the same way. --quick runs 8 s windows and
only the 1 s and 250 ms intervals. Needs root (KVM), a release build and the tiny guests.
Python 3 standard library only.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("ARKVM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "arkvm"))
ARKVM = os.environ.get("ARKVM_BIN", os.path.join(ROOT, "target", "release", "arkvm"))
GUEST = os.path.join(CACHE, "guests", "memory.elf")
SCRATCH = os.path.join(os.environ.get("ARKVM_BENCH_DIR", "/var/tmp/arkvm-bench"), f"dr-{os.getpid()}")
MEMORY = "1G"
REGION_START = 4 << 20  # the memory guest's region starts at 4 MiB
PAGE = 4096
# arkvm.rate_pages is page writes per millisecond: 10 MiB/s = 2.56, 100 MiB/s = 25.6.
RATES = [("~10 MiB/s", 3), ("~100 MiB/s", 26), ("unlimited", None)]

COMMANDS = []  # every distinct command line, for the report
PROCS = []


def die(msg):
    print(f"bench dr: error: {msg}", file=sys.stderr)
    sys.exit(1)


NOTED = set()


def note(cmd):
    """Records the first command of each kind (subcommand, DR or not, guest options)."""
    kind = (tuple(cmd[1:3]), "--dr-target" in cmd, cmd[cmd.index("--cmdline") + 1]
            if "--cmdline" in cmd else "")
    if kind not in NOTED:
        NOTED.add(kind)
        COMMANDS.append(" ".join(f"'{c}'" if " " in c else c for c in cmd))


class Proc:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, cmd):
        note(cmd)
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        PROCS.append(self)
        self.lines = []
        self.err = []
        threading.Thread(target=self._pump, args=(self.p.stdout, self.lines), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.p.stderr, self.err), daemon=True).start()

    @staticmethod
    def _pump(f, out):
        for line in f:
            out.append(line.rstrip("\n"))

    def wait_line(self, needle, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if needle in line:
                    return line
            if self.p.poll() is not None:
                break
            time.sleep(0.02)
        die(f"no '{needle}' from {self.p.args}: {self.lines[-5:]} {self.err[-5:]}")

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def run(cmd, timeout=300):
    note(cmd)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        die(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


def api(sock, method="GET", path="/dr"):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sock)
    s.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
              "Content-Length: 0\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    body = data.split(b"\r\n\r\n", 1)[1]
    return json.loads(body) if body.strip() else None


def page_writes(memory_file):
    """The sum of every region page's generation: the page writes the guest has done."""
    total = 0
    with open(memory_file, "rb") as f:
        f.seek(REGION_START)
        while True:
            block = f.read(64 << 20)
            if not block:
                break
            total += sum(memoryview(block).cast("Q")[:: PAGE // 8])
    return total


def cmdline(rate):
    words = ["console=ttyS0"]
    if rate is not None:
        words.append(f"arkvm.rate_pages={rate}")
    return " ".join(words)


def start_guest(work, rate, extra):
    sock = os.path.join(work, "vm.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    vm = Proc([ARKVM, "run", "--kernel", GUEST, "--memory", MEMORY, "--name", "vm1",
               "--cmdline", cmdline(rate), "--api-socket", sock] + extra)
    vm.wait_line("MEMGUEST hot_pages", 60)
    return vm, sock


def export_reading(repo, key, point_id, taken_at):
    """(time, page writes) of a point, read from its exported memory."""
    wd = os.path.join(os.path.dirname(repo), "export")
    cmd = [ARKVM, "dr", "recover", "--repo", repo]
    if key:
        cmd += ["--key", key]
    run(cmd + ["--id", point_id, "--work-dir", wd, "--export-only"])
    reading = (taken_at, page_writes(os.path.join(wd, point_id, "memory")))
    shutil.rmtree(wd)
    return reading


def baseline(work, rate, window, warmup):
    """Page writes per second without DR, between two incremental backups into a local
    repository, read back the way the DR runs are (the first, full one is not used)."""
    repo = os.path.join(work, "base")
    run([ARKVM, "backup", "init", "--repo", repo])
    vm, sock = start_guest(work, rate, [])
    time.sleep(warmup)
    readings = []
    for n in range(3):
        t = time.time()
        run([ARKVM, "snapshot", "--api-socket", sock, "--repo", repo])
        if n == 0:
            time.sleep(1)
            continue
        point = sorted(os.listdir(os.path.join(repo, "points")))[-1].removesuffix(".json")
        readings.append(export_reading(repo, None, point, t))
        if n == 1:
            time.sleep(window)
    vm.stop()
    shutil.rmtree(repo)
    (t0, w0), (t1, w1) = readings
    return (w1 - w0) / (t1 - t0)


def protected(work, key, rate, interval_ms, window, warmup):
    """One run with continuous protection; returns the measurements."""
    repo = os.path.join(work, "dr")
    rx = Proc([ARKVM, "dr", "serve", "--listen", "127.0.0.1:0", "--repo", repo, "--key", key,
               "--keep", "0"])
    addr = rx.wait_line("dr: listening on", 60).split("listening on ")[1].split(",")[0]
    staging = os.path.join(work, "staging")
    vm, sock = start_guest(work, rate, ["--dr-target", addr, "--dr-interval", f"{interval_ms}ms",
                                        "--key", key, "--dr-staging", staging])
    deadline = time.time() + 60
    while (api(sock) or {}).get("checkpoints_committed", 0) < 2:
        if time.time() > deadline:
            die(f"no checkpoints: {api(sock)}")
        time.sleep(0.05)
    time.sleep(warmup)  # past the first (full) checkpoints and the guest's first pass
    first = api(sock)
    rpos, seen = [], {}
    end = time.time() + window
    while time.time() < end:
        s = api(sock)
        rpos.append(s.get("rpo_ms") or 0)
        c = s.get("last_checkpoint")
        if c:
            seen[c["id"]] = c
        time.sleep(0.1)
    last = api(sock)
    vm.stop()
    time.sleep(0.5)  # let a commit in flight land or be discarded
    readings = [export_reading(repo, key, c["id"], c["taken_at_unix_ms"] / 1000)
                for c in (first["last_checkpoint"], last["last_checkpoint"])]
    rx.stop()
    shutil.rmtree(repo, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    (t0, w0), (t1, w1) = readings
    delta = {k: last[k] - first[k] for k in ("checkpoints_committed", "checkpoints_failed",
                                             "intervals_skipped")}
    cps = list(seen.values())
    return {
        "rate": (w1 - w0) / (t1 - t0) if t1 > t0 else 0.0,
        "committed": delta["checkpoints_committed"],
        "expected": int(window * 1000 / interval_ms),
        "skipped": delta["intervals_skipped"],
        "failed": delta["checkpoints_failed"],
        "rpo_mean": sum(rpos) / len(rpos),
        "rpo_max": max(rpos),
        "bytes": sum(c["bytes_sent"] for c in cps) / max(1, len(cps)),
        "pause_ms": sum(c["pause_us"] for c in cps) / max(1, len(cps)) / 1000,
        "pause_max_ms": max((c["pause_us"] for c in cps), default=0) / 1000,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--window", type=float, default=None, help="seconds measured per run")
    args = ap.parse_args()
    window = args.window or (8.0 if args.quick else 20.0)
    warmup = 5.0 if args.quick else 10.0
    intervals = [1000, 250] if args.quick else [1000, 500, 250, 100]
    for f in (ARKVM, GUEST, "/dev/kvm"):
        if not os.path.exists(f):
            die(f"{f} is missing (cargo build --release --bins; guest-images/build-tiny.sh)")
    os.makedirs(SCRATCH, exist_ok=True)
    key = os.path.join(SCRATCH, "dr.key")
    with open(key, "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    print(f"## DR: {MEMORY} memory guest, checkpoints to `arkvm dr serve` on 127.0.0.1, "
          f"{window:.0f} s measured per run after {warmup:.0f} s of warm-up")
    print()
    print("| dirty rate (set) | real rate without DR (before, after) | interval | checkpoints / expected | "
          "skipped | failed | RPO mean / max | bytes per checkpoint | pause mean / max | "
          "real rate with DR | guest rate vs no DR |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sys.stdout.flush()
    summary = []
    for name, rate in RATES:
        # Baselines before and after the protected runs, for the noise of a shared machine.
        bases = [baseline(SCRATCH, rate, window, warmup)]
        runs = [(i, protected(SCRATCH, key, rate, i, window, warmup)) for i in intervals]
        bases.append(baseline(SCRATCH, rate, window, warmup))
        base = sum(bases) / len(bases)
        sustained = None
        for interval, r in runs:
            ok = r["skipped"] == 0 and r["failed"] == 0
            if ok:
                sustained = interval if sustained is None else min(sustained, interval)
            print(f"| {name} ({rate if rate is not None else '-'} pages/ms) | "
                  f"{bases[0] * PAGE / 2**20:.1f}, {bases[1] * PAGE / 2**20:.1f} MiB/s | {interval} ms | "
                  f"{r['committed']} / {r['expected']} | {r['skipped']} | {r['failed']} | "
                  f"{r['rpo_mean']:.0f} / {r['rpo_max']} ms | {r['bytes'] / 1024:.1f} KiB | "
                  f"{r['pause_ms']:.1f} / {r['pause_max_ms']:.1f} ms | "
                  f"{r['rate'] * PAGE / 2**20:.1f} MiB/s | {r['rate'] / base:.3f} |")
            sys.stdout.flush()
        summary.append((name, sustained))
    print()
    for name, sustained in summary:
        print(f"- {name}: shortest interval sustained without skipping: "
              f"{f'{sustained} ms' if sustained else 'none of ' + str(intervals)}")
    print()
    print("Commands (paths as run):")
    print()
    for c in COMMANDS:
        print(f"    {c}")


if __name__ == "__main__":
    try:
        main()
    finally:
        for p in PROCS:
            p.stop()
        shutil.rmtree(SCRATCH, ignore_errors=True)
