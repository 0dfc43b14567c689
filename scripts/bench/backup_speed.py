#!/usr/bin/env python3
"""Full backups of incompressible and realistic memory against `dd` (issue 16).

For each size and fill (`arkvm.fill=random`: xorshift64* bytes; `arkvm.fill=mixed`: zero pages,
text, the guest's own code, a repeated page and random pages), the memory guest fills its
memory, then only reads it (`arkvm.hot_pct=0`), and one full live backup goes into a fresh
repository (realistic memory also with `--compression fast` and `off`). Its throughput (guest memory bytes / total time) is compared with `dd` writing the
same number of bytes (from /dev/urandom data staged in memory first, so that dd measures the
disk) to the same filesystem, run just before it. Each stage's throughput comes from arkvm's
`backup object stages:` log line (busy time per stage, summed over the worker threads).

  scripts/bench/backup_speed.py [--quick] [SIZE ...]     # default 1G 4G; --quick: 256M
"""

import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

# Each row's repository is kept until the whole run ends. On an ext4 without a journal (this
# machine's), inode allocation skips every inode freed in the last 60 s (300 s while its inode
# table block is dirty), scanning past each one (fs/ext4/ialloc.c, recently_deleted): removing
# the previous row's thousands of chunk files right before a backup made creating its own
# several times slower. Run the benchmark a few minutes after any mass deletion.

# (fill, --compression): realistic memory also with the faster zstd level and with none.
ROWS = [("random", "default"), ("mixed", "default"), ("mixed", "fast"), ("mixed", "off")]
STAGES = re.compile(r'backup object stages: (.*)')


def dd_random(s, mib):
    """dd of `mib` MiB of random bytes (read from a tmpfs copy) with fsync: (bytes/s, argv)."""
    src = f"/dev/shm/arkvm-bench-dd-{os.getpid()}"
    subprocess.run(["dd", "if=/dev/urandom", f"of={src}", "bs=1M", f"count={mib}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dst = s.path("dd.bin")
    argv = ["dd", f"if={src}", f"of={dst}", "bs=1M", f"count={mib}", "conv=fsync"]
    try:
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        secs = time.perf_counter() - t0
    finally:
        os.unlink(src)
        if os.path.exists(dst):
            os.unlink(dst)
        # The file system is mounted with `discard` here: freed blocks are discarded at the
        # next journal commit, which holds up every file creation until it is done. Commit
        # now, so that the backup measured next does not pay for the baseline's cleanup.
        os.sync()
    return mib * 1048576 / secs, argv


def one(s, size, mib, fill, compression):
    repo = s.path(f"repo-{size}-{fill}-{compression}")
    sock = s.path(f"bk-{size}-{fill}-{compression}.sock")
    subprocess.run([s.arkvm, "backup", "init", "--repo", repo], check=True,
                   stdout=subprocess.DEVNULL)
    argv = [s.arkvm, "--log-level", "info", "run", "--kernel", B.guest("memory"),
            "--memory", size, "--api-socket", sock,
            "--cmdline", f"arkvm.fill={fill} arkvm.hot_pct=0"]
    vm = B.Proc(argv)
    try:
        first = vm.wait_line(r"^PASS ", timeout=600)
        if first is None:
            raise B.GuestLost(f"memory guest at {size}: {vm.lost() or 'no progress'}")
        dd_rate, dd_argv = dd_random(s, mib)
        load = "%.1f" % os.getloadavg()[0]
        snap = [s.arkvm, "snapshot", "--api-socket", sock, "--repo", repo, "--json"]
        if compression != "default":
            snap += ["--compression", compression]
        r = subprocess.run(snap, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=1800)
        if r.returncode != 0:
            B.die(f"backup failed: {r.stderr.strip()[-300:]}")
        report = json.loads(r.stdout.strip().splitlines()[-1])
        time.sleep(0.5)
        stage_lines = [m.group(1) for _, _, line in vm.lines("err")
                       for m in [STAGES.search(line)] if m and "memory" in line]
        return {"argv": argv, "snap": snap, "dd_argv": dd_argv, "dd": dd_rate,
                "report": report, "stages": stage_lines[-1] if stage_lines else "n/a",
                "load": load, "torn": B.torn(vm)}
    finally:
        vm.stop(s.arkvm, sock)


def main():
    quick = B.quick_flag(sys.argv)
    sizes = [a for a in sys.argv[1:] if not a.startswith("--")] or (
        ["256M"] if quick else ["1G", "4G"])
    with B.Scratch("backup_speed") as s:
        B.heading("full backup of random and mixed memory against dd of the same bytes")
        B.print_facts(B.machine_facts(s.dir), s)
        rows, stages = [], []
        for size in sizes:
            mib = int(size[:-1]) * (1024 if size.endswith("G") else 1)
            for fill, compression in ROWS:
                r = B.retry(one, s, size, mib, fill, compression)
                B.show_command(r["argv"])
                rep = r["report"]
                secs = rep["total_ms"] / 1000.0
                rate = mib * 1048576 / secs
                rows.append([size, fill, compression, f"{rep['total_ms']}",
                             f"{rate / 1e6:.0f}", f"{r['dd'] / 1e6:.0f}", f"{rate / r['dd']:.2f}x",
                             f"{rep['pause_us']}", r["load"], "YES" if r["torn"] else "no"])
                stages.append(f"{size} {fill} {compression}: {r['stages']}")
        B.show_command(r["snap"])
        B.show_command(r["dd_argv"])
        print()
        B.table(["size", "fill", "compression", "backup ms", "backup MB/s", "dd MB/s", "backup / dd",
                 "pause us", "load", "TORN"], rows)
        print()
        for line in stages:
            B.note("stages " + line)
        B.note("stage figures: bytes in, busy microseconds summed over worker threads, and MB/s "
               "of one busy thread (zero-check runs on every chunk, hash/compress/seal/store "
               "only on chunks not recognised as zeros)")
        B.note(f"load average at the end: {'%.2f %.2f %.2f' % os.getloadavg()}")


if __name__ == "__main__":
    main()
