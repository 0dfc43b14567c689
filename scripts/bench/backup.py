#!/usr/bin/env python3
"""Backup repository benchmark (issue 6): a full and an incremental (about 1% dirty) live backup
of a 2 GiB memory guest into a repository, as ratios of each other; dedup and compression
ratios; full-backup throughput against `dd` of the same bytes to the same filesystem, in the
same run."""

import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402


def backup(arkvm, sock, repo):
    argv = [arkvm, "snapshot", "--api-socket", sock, "--repo", repo, "--json"]
    t0 = time.perf_counter()
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        B.die(f"backup failed: {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1]), wall, argv


def points(arkvm, repo):
    r = subprocess.run([arkvm, "backup", "list", "--repo", repo, "--json"], check=True,
                       stdout=subprocess.PIPE, text=True)
    return {p["id"]: p for p in json.loads(r.stdout)}


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.lstat(os.path.join(root, f)).st_blocks * 512
    return total


def main():
    quick = B.quick_flag(sys.argv)
    mem_mib = 512 if quick else 2048
    arkvm = os.path.join(B.ROOT, "target", "release", "arkvm")
    if not os.path.exists(arkvm):
        B.die(f"{arkvm} is missing: cargo build --release --bins")
    os.makedirs(B.SCRATCH_BASE, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="backup-", dir=B.SCRATCH_BASE)
    B.heading(f"backup repository: {mem_mib} MiB memory guest, 1% hot set")
    B.print_facts(B.machine_facts(scratch))
    repo = os.path.join(scratch, "repo")
    sock = os.path.join(scratch, "vm.sock")
    subprocess.run([arkvm, "backup", "init", "--repo", repo], check=True, stdout=subprocess.DEVNULL)
    vm = B.Proc([arkvm, "run", "--kernel", B.guest("memory"), "--memory", f"{mem_mib}M",
                 "--api-socket", sock, "--cmdline", "arkvm.hot_pct=1"])
    try:
        # The first full pass over memory, then the 1% hot set only.
        if vm.wait_line(r"^PASS", timeout=300) is None:
            B.die(f"the guest did not start: {vm.lost()}")
        full, full_wall, argv = backup(arkvm, sock, repo)
        B.show_command(argv)
        time.sleep(1.0)
        inc, inc_wall, _ = backup(arkvm, sock, repo)
        pts = points(arkvm, repo)
        pf, pi = pts[full["id"]], pts[inc["id"]]
        dd_rate, dd_argv = B.dd_write(os.path.join(scratch, "dd.bin"), mem_mib)
        B.show_command(dd_argv)
        repo_bytes = du(os.path.join(repo, "chunks"))
        full_rate = pf["bytes_hashed"] / (full["total_ms"] / 1000.0)
        rows = [
            ["full", f"{full['total_ms']} ms", f"{pf['bytes_hashed'] >> 20} MiB",
             f"{pf['bytes_stored'] / 1024:.1f} KiB", f"{full['pause_us'] / 1000:.2f} ms"],
            ["incremental", f"{inc['total_ms']} ms", f"{pi['bytes_hashed'] >> 20} MiB",
             f"{pi['bytes_stored'] / 1024:.1f} KiB", f"{inc['pause_us'] / 1000:.2f} ms"],
            ["incremental / full", f"{inc['total_ms'] / max(full['total_ms'], 1):.3f}",
             f"{pi['bytes_hashed'] / max(pf['bytes_hashed'], 1):.4f}",
             f"{pi['bytes_stored'] / max(pf['bytes_stored'], 1):.3f}", ""],
        ]
        B.table(["backup", "time", "bytes read+hashed", "bytes stored", "vCPU pause"], rows)
        logical = pf["bytes_total"] + pi["bytes_total"]
        print(f"  dedup + compression: {logical >> 20} MiB of points in {repo_bytes / 1024:.0f} KiB "
              f"of chunk files ({logical / max(repo_bytes, 1):.0f}x)")
        print(f"  compression of the full backup: {pf['bytes_hashed'] / max(pf['bytes_stored'], 1):.0f}x "
              f"(the memory guest's pages hold two non-zero words each)")
        print(f"  full backup throughput: {full_rate / 2**20:.0f} MiB/s read+hashed, "
              f"{full_rate / dd_rate:.2f}x of dd writing {mem_mib} MiB ({dd_rate / 2**20:.0f} MiB/s)")
        if vm.lost():
            B.die(vm.lost())
        if B.torn(vm):
            B.die("the guest reported TORN")
    finally:
        vm.stop(arkvm, sock)
        B.drop_dir(scratch)


if __name__ == "__main__":
    main()
