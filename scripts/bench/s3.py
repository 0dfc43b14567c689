#!/usr/bin/env python3
"""S3 repository benchmark (issue 12).

For each size, a memory guest that fills its memory with incompressible bytes
(`arkvm.fill=random`) and keeps rewriting a 1% hot set (`arkvm.hot_pct=1`) gets, in one run:
a full live backup into a fresh `s3://` repository on Ceph RGW and, one second later, an
incremental one; the same two into a fresh local directory; and the baseline, a plain PUT of
the same number of objects of the same size (object_store, as many requests in flight as a
backup keeps: `WRITES_IN_FLIGHT`) to the same RGW. The chunks of random memory are stored
plain, so the baseline moves the same bytes.

RGW runs in a cluster of its own (`scripts/ceph-rgw` with a BlueStore OSD on a sparse file, so
gigabytes fit; other ports and directory than the tests' cluster), stopped at the end.

  scripts/bench/s3.py [--quick] [SIZE ...]     # default 1G 4G; --quick: 256M
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

# As many PUTs in flight as a backup into S3 keeps (snapshot/src/repo/s3/mod.rs).
STREAMS = 8
CLUSTER = {
    "ARKVM_CEPH_DIR": os.path.join(B.CACHE, "ceph-bench"),
    "ARKVM_RGW_PORT": "17580",
    "ARKVM_MON_PORT": "16889",
    "ARKVM_CEPH_STORE": "bluestore",
}


def ark(s, *args):
    r = subprocess.run([s.arkvm, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=1800)
    if r.returncode != 0:
        B.die(f"arkvm {' '.join(args[:2])} failed: {r.stderr.strip()[-300:]}")
    return r.stdout


def backup(s, sock, repo):
    argv = [s.arkvm, "snapshot", "--api-socket", sock, "--repo", repo, "--json"]
    out = ark(s, *argv[1:])
    return json.loads(out.strip().splitlines()[-1]), argv


def point(s, repo, pid):
    points = json.loads(ark(s, "backup", "list", "--repo", repo, "--json"))
    return {p["id"]: p for p in points}[pid]


def put_baseline(url, count, size):
    exe = os.path.join(B.ROOT, "target", "release", "examples", "s3_put")
    argv = [exe, url, str(count), str(size), str(STREAMS)]
    r = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
    return int(r.stdout.strip()), argv


def one(s, size, bucket, stamp):
    """One guest of `size`: the four backups and the baseline; a result row dict."""
    s3 = f"s3://{bucket}/bench-{stamp}-{size}"
    local = s.path(f"repo-{size}")
    for repo in (s3, local):
        ark(s, "backup", "init", "--repo", repo)
    sock = s.path(f"vm-{size}.sock")
    argv = [s.arkvm, "--log-level", "info", "run", "--kernel", B.guest("memory"),
            "--memory", size, "--api-socket", sock,
            "--cmdline", "arkvm.fill=random arkvm.hot_pct=1"]
    vm = B.Proc(argv)
    try:
        if vm.wait_line(r"^PASS ", timeout=600) is None:
            raise B.GuestLost(f"memory guest at {size}: {vm.lost() or 'no progress'}")
        load = "%.1f" % os.getloadavg()[0]
        res = {"argv": argv, "load": load}
        for name, repo in (("s3", s3), ("local", local)):
            full, res["snap"] = backup(s, sock, repo)
            time.sleep(1.0)
            inc, _ = backup(s, sock, repo)
            res[name] = (full, inc, point(s, repo, full["id"]), point(s, repo, inc["id"]))
        pf = res["s3"][2]
        res["put_size"] = max(1, pf["bytes_stored"] // max(pf["chunks_new"], 1))
        res["put_ms"], res["put_argv"] = put_baseline(f"{s3}-put", pf["chunks_new"],
                                                      res["put_size"])
        res["torn"] = B.torn(vm)
        if vm.lost():
            raise B.GuestLost(vm.lost())
        return res
    finally:
        vm.stop(s.arkvm, sock)
        B.drop_dir(local)


def mib_of(size):
    return int(size[:-1]) * (1024 if size.endswith("G") else 1)


def main():
    quick = B.quick_flag(sys.argv)
    sizes = [a for a in sys.argv[1:] if not a.startswith("--")] or (
        ["256M"] if quick else ["1G", "4G"])
    subprocess.run(["cargo", "build", "--release", "-p", "snapshot", "--example", "s3_put"],
                   check=True, cwd=B.ROOT, stderr=subprocess.DEVNULL)
    # Room for each size three times (backup, baseline, slack) and RGW's own pools.
    block = (sum(mib_of(x) for x in sizes) * 3 + 4096) << 20
    env = dict(os.environ, **CLUSTER, ARKVM_CEPH_BLUESTORE_BYTES=str(block))
    script = os.path.join(B.ROOT, "scripts", "ceph-rgw")
    started = subprocess.run(["bash", script, "start"], env=env, stdout=subprocess.PIPE,
                             text=True)
    try:
        if started.returncode != 0:
            B.die("scripts/ceph-rgw start failed (its log is under "
                  f"{CLUSTER['ARKVM_CEPH_DIR']})")
        for line in started.stdout.splitlines():
            if line.startswith("export ") and "=" in line:
                k, v = line[len("export "):].split("=", 1)
                os.environ[k] = v
        with B.Scratch("s3") as s:
            B.heading("backup to S3 (Ceph RGW, BlueStore OSD) against a local directory and "
                      f"a plain {STREAMS}-stream PUT of the same bytes; random memory, 1% hot set")
            B.print_facts(B.machine_facts(s.dir), s)
            stamp = int(time.time())
            rows, ratios = [], []
            for size in sizes:
                r = B.retry(one, s, size, os.environ["ARKVM_TEST_BUCKET"], stamp)
                B.show_command(r["argv"])
                f3, i3, pf, pi = r["s3"]
                fl, il, plf, _ = r["local"]
                mb = lambda n, ms: f"{n / 1e6 / max(ms, 1) * 1000:.0f}"  # noqa: E731
                put_bytes = pf["chunks_new"] * r["put_size"]
                rows += [
                    [size, "s3 full", str(f3["total_ms"]), str(pf["chunks_new"]),
                     f"{pf['bytes_stored'] >> 20}", mb(pf["bytes_stored"], f3["total_ms"]),
                     r["load"]],
                    [size, "s3 incremental", str(i3["total_ms"]), str(pi["chunks_new"]),
                     f"{pi['bytes_stored'] >> 20}", mb(pi["bytes_stored"], i3["total_ms"]), ""],
                    [size, "local full", str(fl["total_ms"]), str(plf["chunks_new"]),
                     f"{plf['bytes_stored'] >> 20}", mb(plf["bytes_stored"], fl["total_ms"]),
                     ""],
                    [size, "local incremental", str(il["total_ms"]), "", "", "", ""],
                    [size, f"PUT, {STREAMS} streams", str(r["put_ms"]), str(pf["chunks_new"]),
                     f"{put_bytes >> 20}", mb(put_bytes, r["put_ms"]), ""],
                ]
                q = lambda a, b: f"{a / max(b, 1):.2f}"  # noqa: E731
                ratios.append(
                    f"{size}: s3 full throughput / PUT throughput: "
                    f"{q(pf['bytes_stored'] * r['put_ms'], put_bytes * f3['total_ms'])} "
                    f"(goal >= 0.8); s3 incremental / s3 full time: "
                    f"{q(i3['total_ms'], f3['total_ms'])} (goal <= 0.05); "
                    f"s3 full / local full time: {q(f3['total_ms'], fl['total_ms'])}; "
                    f"torn: {'YES' if r['torn'] else 'no'}")
            B.show_command(r["snap"])
            B.show_command(r["put_argv"])
            print()
            B.table(["size", "run", "ms", "objects", "MiB uploaded", "MB/s", "load"], rows)
            print()
            for line in ratios:
                B.note(line)
            B.note(f"load average at the end: {'%.2f %.2f %.2f' % os.getloadavg()}")
    finally:
        subprocess.run(["bash", script, "stop"], env=env, stderr=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
