#!/usr/bin/env python3
"""virtio-net benchmark (issue 14): echo round trips per second and bulk echo throughput between
the host and the net guest through a tap, against the same traffic between two host endpoints
through the same kind of tap (a host process echoing on a tap, in the same run); then the guest
again with DR output commit at 100 ms and 1 s checkpoint intervals (added latency, throughput).

Everything runs in a network namespace of its own (deleted at the end). The client is the same
Python raw socket in every case, so the ratios compare the echo side; absolute numbers are
bounded by the Python client.

Usage: python3 scripts/bench/net.py [--quick]      (needs root, /dev/kvm, a release build)
"""

import fcntl
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

ETHERTYPE = 0x88B5
HOST_MAC = bytes([2, 0, 0, 0, 0, 1])
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI = 0x0002, 0x1000


def ip(*args):
    subprocess.run(["ip", *args], check=True)


def request(mac, seq, size):
    head = mac + HOST_MAC + struct.pack(">H", ETHERTYPE) + b"ARKN" + bytes([1, 0]) + bytes(8)
    head += struct.pack("<Q", seq)
    return head + bytes((seq + i) & 0xFF for i in range(size - len(head)))


def host_echo(tap):
    """The host-only baseline: echoes requests on a tap, as the guest does."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", tap.encode(), IFF_TAP | IFF_NO_PI))
    count = 0
    while True:
        f = bytearray(os.read(fd, 65536))
        if len(f) < 36 or f[12:14] != b"\x88\xb5" or f[18] != 1:
            continue
        count += 1
        f[0:6], f[6:12] = f[6:12], b"\x02\x00\x00\x00\x00\x02"
        f[18] = 2
        f[20:28] = struct.pack("<Q", count)
        os.write(fd, bytes(f))


class Client:
    def __init__(self, tap):
        self.s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
        self.s.bind((tap, ETHERTYPE))
        # Room for a whole released burst of held frames (SO_RCVBUFFORCE, root only).
        self.s.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)
        self.s.settimeout(0.05)

    def recv_reply(self):
        while True:
            try:
                f = self.s.recv(65536)
            except socket.timeout:
                return None
            if len(f) >= 36 and f[14:18] == b"ARKN" and f[18] == 2:
                return f

    def drain(self):
        while self.recv_reply() is not None:
            pass

    def round_trips(self, mac, seconds):
        """Window 1: one request, wait for its reply. Returns (round trips/s, median ms)."""
        self.drain()
        lat, seq, end = [], 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            seq += 1
            t0 = time.perf_counter()
            self.s.send(request(mac, seq, 64))
            give_up = t0 + 5.0
            while time.perf_counter() < give_up:
                f = self.recv_reply()
                if f is None:
                    continue
                if struct.unpack("<Q", f[28:36])[0] == seq:
                    lat.append(time.perf_counter() - t0)
                    break
        total = sum(lat)
        return (len(lat) / total if total else 0.0), (sorted(lat)[len(lat) // 2] * 1e3 if lat else 0.0)

    def bulk(self, mac, seconds, window=64, size=1514):
        """Echo of full-size frames with `window` outstanding. Returns echoed MB/s (one way)."""
        self.drain()
        seq, outstanding, got, end = 0, 0, 0, time.perf_counter() + seconds
        t0 = time.perf_counter()
        frame_cache = request(mac, 0, size)
        while time.perf_counter() < end:
            while outstanding < window:
                self.s.send(frame_cache)
                outstanding += 1
                seq += 1
            f = self.recv_reply()
            if f is None:
                outstanding = 0  # refill after a loss or a long hold
                continue
            got += len(f)
            outstanding -= 1
        return got / (time.perf_counter() - t0) / 1e6


def wait_ready(proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            B.die("arkvm exited before the guest came up")
        if "NETGUEST READY" in line:
            return bytes(int(x, 16) for x in line.split("mac=")[1].strip().split(":"))
    B.die("the net guest did not come up")


def start_guest(arkvm, tap, extra):
    argv = [arkvm, "run", "--kernel", B.guest("net"), "--memory", "64M", "--net",
            f"tap={tap}", "--cmdline", "arkvm.hb_ms=1000", *extra]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return p, wait_ready(p), argv


def inner(quick, scratch):
    arkvm = os.path.join(B.ROOT, "target", "release", "arkvm")
    secs = 3 if quick else 8
    ip("link", "set", "lo", "up")
    for t in ("bnt0", "bnt1"):
        ip("tuntap", "add", "dev", t, "mode", "tap")
        ip("link", "set", t, "up")
    rows = []
    echo = multiprocessing.Process(target=host_echo, args=("bnt0",), daemon=True)
    echo.start()
    time.sleep(0.3)
    c0 = Client("bnt0")
    mac0 = bytes([2, 0, 0, 0, 0, 2])
    base_rt, base_lat = c0.round_trips(mac0, secs)
    base_bulk = c0.bulk(mac0, secs)
    echo.terminate()
    rows.append(("host echo process on a tap (baseline)", base_rt, base_lat, base_bulk, "-"))
    c1 = Client("bnt1")
    p, mac, argv = start_guest(arkvm, "bnt1", [])
    B.show_command(argv)
    rt, lat, bulk = c1.round_trips(mac, secs), None, c1.bulk(mac, secs)
    rt, lat = rt
    p.kill()
    p.wait()
    rows.append(("arkvm guest", rt, lat, bulk, f"{rt / base_rt:.2f} / {bulk / base_bulk:.2f}"))
    key = os.path.join(scratch, "key")
    with open(key, "w") as f:
        f.write("77" * 32 + "\n")
    os.chmod(key, 0o600)
    for interval in ("100ms", "1s"):
        repo = os.path.join(scratch, f"dr-{interval}")
        recv = subprocess.Popen([arkvm, "dr", "serve", "--listen", "127.0.0.1:0", "--repo", repo,
                                 "--key", key], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        addr = None
        while addr is None:
            line = recv.stdout.readline()
            if not line:
                B.die("dr serve did not start")
            if "listening on" in line:
                addr = line.split("listening on ")[1].split(",")[0].strip()
        p, mac, argv = start_guest(arkvm, "bnt1", [
            "--dr-target", addr, "--dr-interval", interval, "--key", key, "--dr-output-commit",
            "--dr-staging", os.path.join(scratch, f"staging-{interval}")])
        B.show_command(argv)
        time.sleep(1.5)
        (rt, lat), bulk = c1.round_trips(mac, secs * 2), c1.bulk(mac, secs * 2, window=256)
        p.kill()
        p.wait()
        recv.kill()
        recv.wait()
        rows.append((f"arkvm guest, output commit, {interval} checkpoints", rt, lat, bulk,
                     f"{rt / base_rt:.3f} / {bulk / base_bulk:.3f}"))
    B.table(["echo side", "round trips/s", "median RTT ms", "bulk echo MB/s", "ratio vs baseline (rt / bulk)"],
            [[r[0], f"{r[1]:.0f}", f"{r[2]:.3f}", f"{r[3]:.2f}", r[4]] for r in rows])


def main():
    quick = B.quick_flag(sys.argv)
    if "--inner" in sys.argv:
        inner(quick, sys.argv[sys.argv.index("--inner") + 1])
        return
    if os.geteuid() != 0:
        B.die("net.py needs root (network namespace, taps)")
    os.makedirs(B.SCRATCH_BASE, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="net-", dir=B.SCRATCH_BASE)
    ns = f"arkvm-bench-net-{os.getpid()}"
    B.heading("virtio-net: echo round trips and bulk echo, guest vs host tap echo; output commit")
    B.note(f"load average {os.getloadavg()[0]:.1f}")
    ip("netns", "add", ns)
    try:
        args = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--inner", scratch]
        if quick:
            args.append("--quick")
        subprocess.run(args, check=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns])
        B.drop_dir(scratch)
    B.note(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
