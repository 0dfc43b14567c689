"""Shared helpers for the arkvm benchmarks (python3 standard library only).

Every benchmark prints a small table, the exact commands it ran, and ratios against a baseline
taken in the same run, because the machines these run on are shared and noisy.
"""

import atexit
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("ARKVM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "arkvm"))
GUESTS = os.path.join(CACHE, "guests")
# Snapshots, dd baselines and disk images all go here, so baseline and subject share a filesystem.
SCRATCH_BASE = os.environ.get("ARKVM_BENCH_DIR", "/var/tmp/arkvm-bench")

BOOT_TIMINGS = re.compile(
    r"boot timings: create_vm_us=(\d+) memory_us=(\d+) load_us=(\d+) vcpus_us=(\d+)"
)
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")
PASS_LINE = re.compile(r"^PASS (\d+) GEN (\d+)")


def die(msg):
    print(f"bench: error: {msg}", file=sys.stderr)
    sys.exit(1)


class GuestLost(Exception):
    """A guest stopped before the benchmark was done with it."""


def retry(fn, *args):
    """Runs fn(*args), and once more if it raised GuestLost (on a shared machine something
    else can end a VM: seen here as `guest stopped: shutdown requested` nobody here asked for)."""
    try:
        return fn(*args)
    except GuestLost as e:
        print(f"  (guest lost: {e}; retrying once)")
        sys.stdout.flush()
        try:
            return fn(*args)
        except GuestLost as e2:
            die(f"guest lost twice: {e2}")


def guest(name):
    path = os.path.join(GUESTS, f"{name}.elf")
    if not os.path.exists(path):
        die(f"{path} is missing: run `bash guest-images/build-tiny.sh` first")
    return path


class Scratch:
    """A private directory under SCRATCH_BASE, removed on exit, holding a frozen arkvm copy.

    The release binary in the shared target directory can be rebuilt by someone else in the
    middle of a run, so the benchmark runs a copy taken at the start.
    """

    def __init__(self, prefix):
        os.makedirs(SCRATCH_BASE, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix=prefix + "-", dir=SCRATCH_BASE)
        src = os.environ.get("ARKVM_BIN", os.path.join(ROOT, "target", "release", "arkvm"))
        if not os.path.exists(src):
            die(f"{src} is missing: run `cargo build --release --bins` in {ROOT}")
        self.arkvm = os.path.join(self.dir, "arkvm")
        self.arkvm_mtime = os.stat(src).st_mtime
        shutil.copy2(src, self.arkvm)
        self.arkvm_source = src

    def path(self, name):
        return os.path.join(self.dir, name)

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def log_walltime(line):
    """Epoch seconds of a tracing log line (`2026-...Z  INFO ...`), or None."""
    m = LOG_TIME.match(line)
    if not m:
        return None
    dt = datetime.datetime.strptime(m.group(1)[:26], "%Y-%m-%dT%H:%M:%S.%f")
    return dt.replace(tzinfo=datetime.timezone.utc).timestamp()


def parse_boot_timings(lines):
    for line in lines:
        m = BOOT_TIMINGS.search(line)
        if m:
            return dict(zip(("create_vm_us", "memory_us", "load_us", "vcpus_us"),
                            (int(g) for g in m.groups())))
    return None


_CHILDREN = []


@atexit.register
def _kill_children():
    """A benchmark that fails half-way must not leave a guest running on a shared machine."""
    for p in _CHILDREN:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()


class Proc:
    """A child process whose stdout and stderr lines are kept with host timestamps.

    Each entry is (perf_counter, epoch seconds, line). `t0` is perf_counter just before spawn.
    """

    def __init__(self, argv, env=None):
        self.argv = argv
        self.out = []
        self.err = []
        self.cond = threading.Condition()
        self.t0 = time.perf_counter()
        self.wall0 = time.time()
        self.p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env)
        _CHILDREN.append(self.p)
        self.readers = [threading.Thread(target=self._read, args=(self.p.stdout, self.out),
                                         daemon=True),
                        threading.Thread(target=self._read, args=(self.p.stderr, self.err),
                                         daemon=True)]
        for r in self.readers:
            r.start()

    def _read(self, stream, sink):
        for raw in iter(stream.readline, b""):
            now = time.perf_counter()
            wall = time.time()
            with self.cond:
                sink.append((now, wall, raw.decode(errors="replace").rstrip("\n")))
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def wait_line(self, pattern, stream="out", start=0, timeout=60.0):
        """Index of the first line at or after `start` that matches `pattern`, or None."""
        rx = re.compile(pattern)
        sink = self.out if stream == "out" else self.err
        deadline = time.perf_counter() + timeout
        with self.cond:
            i = start
            while True:
                while i < len(sink):
                    if rx.search(sink[i][2]):
                        return i
                    i += 1
                left = deadline - time.perf_counter()
                if left <= 0 or (self.p.poll() is not None and not any(
                        r.is_alive() for r in self.readers)):
                    return None
                self.cond.wait(min(left, 0.5))

    def lines(self, stream="out"):
        with self.cond:
            return list(self.out if stream == "out" else self.err)

    def lost(self):
        """Why the child ended by itself (a one-line reason), or None while it runs."""
        if self.p.poll() is None:
            return None
        tail = [line for _, _, line in self.lines("err")][-1:] or ["no stderr"]
        return f"arkvm exited with status {self.p.returncode}: {tail[0][-160:]}"

    def stop(self, arkvm=None, socket=None, timeout=15.0):
        """Ask for a shutdown through the control socket, else SIGKILL this child."""
        if self.p.poll() is None and arkvm and socket and os.path.exists(socket):
            subprocess.run([arkvm, "shutdown", "--api-socket", socket],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        try:
            self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.p.pid, signal.SIGKILL)
            self.p.wait()
        for r in self.readers:
            r.join(timeout=5)
        return self.p.returncode

    def stderr_text(self):
        return "\n".join(line for _, _, line in self.lines("err"))


def passes(proc):
    """[(perf_counter, passes)] from the memory guest's PASS lines."""
    res = []
    for t, _, line in proc.lines("out"):
        m = PASS_LINE.match(line)
        if m:
            res.append((t, int(m.group(1))))
    return res


def pass_rate(points, t_start, t_end):
    """Passes per second between the first and last PASS line inside [t_start, t_end]."""
    inside = [(t, n) for t, n in points if t_start <= t <= t_end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def running_fraction(points, t_start, t_end, base_rate):
    """The share of [t_start, t_end] the guest was effectively running at `base_rate`.

    PASS lines come about every 50 ms at full speed but can be seconds apart while the guest is
    held, so the rate inside a short window cannot be read from the lines inside it. Instead take
    the last line at or before t_start and the first at or after t_end, and charge every second
    that the passes between them fell short of `base_rate` to the window:
    1 - (elapsed - passes / base_rate) / (t_end - t_start).
    """
    before = [(t, n) for t, n in points if t <= t_start]
    after = [(t, n) for t, n in points if t >= t_end]
    if not before or not after or not base_rate or t_end <= t_start:
        return None
    (tb, nb), (ta, na) = before[-1], after[0]
    lost = (ta - tb) - (na - nb) / base_rate
    return 1.0 - lost / (t_end - t_start)


def torn(proc):
    return any("TORN" in line or "GUEST FAULT" in line for _, _, line in proc.lines("out"))


def run_snapshot(arkvm, socket, out_dir, extra):
    """Runs `arkvm snapshot ... --json`; returns (report dict or None, wall seconds, argv, text)."""
    argv = [arkvm, "snapshot", "--api-socket", socket, "--out", out_dir, "--json"] + extra
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=900)
    wall = time.perf_counter() - t0
    report = None
    for line in r.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                report = json.loads(line)
            except ValueError:
                pass
    text = (r.stdout + r.stderr).strip()
    if r.returncode != 0:
        report = None
    return report, wall, argv, text


def dd_write(path, mib):
    """`dd if=/dev/zero of=path bs=1M count=mib conv=fsync`: (bytes/s, argv). Removes the file."""
    argv = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secs = time.perf_counter() - t0
    os.unlink(path)
    return mib * 1048576 / secs, argv


def drop_dir(path):
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["sync"], check=False)


def stats(values):
    """(median, min, max) of the non-None values, or None."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    return statistics.median(v), min(v), max(v)


def fmt_stats(values, scale=1.0, digits=1):
    s = stats(values)
    if s is None:
        return "n/a"
    med, lo, hi = (x * scale for x in s)
    return f"{med:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def fmt(x, digits=2, unit=""):
    if x is None:
        return "n/a"
    return f"{x:.{digits}f}{unit}"


def table(headers, rows):
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    sys.stdout.flush()


def show_command(argv):
    print("  $ " + " ".join(argv))
    sys.stdout.flush()


def heading(title):
    print(f"\n## {title}\n")
    sys.stdout.flush()


def note(msg):
    print(f"  {msg}")
    sys.stdout.flush()


def binary_facts(path, source, mtime):
    """Which build ran: the copy's blake2 prefix and the source binary's mtime at copy time."""
    h = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    mtime = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc)
    return f"{source} (built {mtime.strftime('%Y-%m-%d %H:%M:%S UTC')}, blake2b-64 {h.hexdigest()})"


def machine_facts(scratch_dir):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kvm = "kvm_pvm (software-nested)" if os.path.exists("/sys/module/kvm_pvm") else (
        "kvm_intel" if os.path.exists("/sys/module/kvm_intel") else
        "kvm_amd" if os.path.exists("/sys/module/kvm_amd") else "?")
    fs = subprocess.run(["df", "--output=source,fstype", scratch_dir], text=True,
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.split("\n")
    fs = fs[1].split() if len(fs) > 1 else ["?", "?"]
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu} x{os.cpu_count()}",
        "memory": f"{mem_gib:.1f} GiB",
        "kernel": platform.release(),
        "kvm": kvm,
        "scratch": f"{scratch_dir} ({fs[1]} on {fs[0]})",
        "load": "%.2f %.2f %.2f" % os.getloadavg(),
        "commit": commit or "?",
    }


def print_facts(facts, scratch=None):
    if scratch is not None:
        facts = dict(facts, arkvm=binary_facts(scratch.arkvm, scratch.arkvm_source,
                                                scratch.arkvm_mtime))
    for k, v in facts.items():
        print(f"  {k}: {v}")
    sys.stdout.flush()


def quick_flag(argv):
    return "--quick" in argv[1:]
