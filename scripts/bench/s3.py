#!/usr/bin/env python3
"""S3 repository benchmark (issue 12): a full and an incremental (1% hot set) live backup of a
1 GiB memory guest into a repository on Ceph RGW (scripts/ceph-rgw), against the same backups
into a local directory, and against a plain multi-stream PUT (object_store, 4 in flight) of the
same number of objects of the same sizes, and of the guest's raw bytes as 1 MiB objects, in the
same run. Leaves RGW running if it was running, else stops it."""

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
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=900)
    if r.returncode != 0:
        B.die(f"backup failed: {r.stderr.strip()}")
    return json.loads(r.stdout.strip().splitlines()[-1]), argv


def point(arkvm, repo, pid):
    r = subprocess.run([arkvm, "backup", "list", "--repo", repo, "--json"], check=True,
                       stdout=subprocess.PIPE, text=True)
    return {p["id"]: p for p in json.loads(r.stdout)}[pid]


def put_baseline(url, count, size, streams):
    exe = os.path.join(B.ROOT, "target", "release", "examples", "s3_put")
    argv = [exe, url, str(count), str(size), str(streams)]
    r = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
    return int(r.stdout.strip()), argv


def main():
    quick = B.quick_flag(sys.argv)
    mem_mib = 256 if quick else 1024
    arkvm = os.path.join(B.ROOT, "target", "release", "arkvm")
    subprocess.run(["cargo", "build", "--release", "-p", "snapshot", "--example", "s3_put"],
                   check=True, cwd=B.ROOT, stderr=subprocess.DEVNULL)
    script = os.path.join(B.ROOT, "scripts", "ceph-rgw")
    was_running = subprocess.run(["bash", script, "env"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL).returncode == 0
    env = subprocess.run(["bash", script, "start"], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    for line in env.splitlines():
        if line.startswith("export ") and "=" in line:
            k, v = line[len("export "):].split("=", 1)
            os.environ[k] = v
    os.makedirs(B.SCRATCH_BASE, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="s3-", dir=B.SCRATCH_BASE)
    B.heading(f"S3 repository on Ceph RGW (memstore OSD): {mem_mib} MiB memory guest, 1% hot set")
    B.print_facts(B.machine_facts(scratch))
    stamp = int(time.time())
    s3 = f"s3://{os.environ['ARKVM_TEST_BUCKET']}/bench-{stamp}"
    local = os.path.join(scratch, "repo")
    for repo in (s3, local):
        subprocess.run([arkvm, "backup", "init", "--repo", repo], check=True,
                       stdout=subprocess.DEVNULL)
    sock = os.path.join(scratch, "vm.sock")
    vm = B.Proc([arkvm, "run", "--kernel", B.guest("memory"), "--memory", f"{mem_mib}M",
                 "--api-socket", sock, "--cmdline", "arkvm.hot_pct=1"], env=dict(os.environ))
    try:
        if vm.wait_line(r"^PASS", timeout=300) is None:
            B.die(f"the guest did not start: {vm.lost()}")
        res = {}
        for name, repo in (("s3", s3), ("local", local)):
            full, argv = backup(arkvm, sock, repo)
            B.show_command(argv)
            time.sleep(1.0)
            inc, _ = backup(arkvm, sock, repo)
            res[name] = (full, inc, point(arkvm, repo, full["id"]), point(arkvm, repo, inc["id"]))
        f3, i3, pf, pi = res["s3"]
        fl, il, _, _ = res["local"]
        size = max(1, pf["bytes_stored"] // max(pf["chunks_new"], 1))
        same_ms, argv = put_baseline(f"{s3}-put", pf["chunks_new"], size, 4)
        B.show_command(argv)
        raw_ms, argv = put_baseline(f"{s3}-raw", mem_mib, 1 << 20, 4)
        B.show_command(argv)
        rows = [
            ["s3 full", f"{f3['total_ms']} ms", str(pf["chunks_new"]), f"{pf['bytes_stored'] / 1024:.0f} KiB"],
            ["s3 incremental", f"{i3['total_ms']} ms", str(pi["chunks_new"]), f"{pi['bytes_stored'] / 1024:.0f} KiB"],
            ["local full", f"{fl['total_ms']} ms", "", ""],
            ["local incremental", f"{il['total_ms']} ms", "", ""],
            [f"PUT {pf['chunks_new']} x {size} B, 4 streams", f"{same_ms} ms", str(pf["chunks_new"]), ""],
            [f"PUT {mem_mib} x 1 MiB, 4 streams", f"{raw_ms} ms", str(mem_mib), f"{mem_mib} MiB"],
        ]
        B.table(["run", "time", "objects", "bytes uploaded"], rows)
        r = lambda a, b: f"{a / max(b, 1):.2f}"  # noqa: E731
        print(f"  s3 full / local full: {r(f3['total_ms'], fl['total_ms'])}; "
              f"s3 incremental / local incremental: {r(i3['total_ms'], il['total_ms'])}")
        print(f"  s3 full / PUT of the same objects: {r(f3['total_ms'], same_ms)}; "
              f"s3 full / PUT of the raw bytes: {r(f3['total_ms'], raw_ms)}")
        print(f"  s3 incremental / s3 full: {r(i3['total_ms'], f3['total_ms'])}")
        print("  load after: %.2f %.2f %.2f" % os.getloadavg())
        if vm.lost():
            B.die(vm.lost())
        if B.torn(vm):
            B.die("the guest reported TORN")
    finally:
        vm.stop(arkvm, sock)
        B.drop_dir(scratch)
        if not was_running:
            subprocess.run(["bash", script, "stop"], stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
