#!/usr/bin/env python3
"""Guest speed during a live cow snapshot (issue 16), with and without the staging pool.

For each memory size and working set (10% of the pages rewritten each pass, or every page), a
memory guest is booted three times: with the default staging pool (`auto`: up to the guest's
size), with the old fixed 64 MiB pool (`--cow-staging 64M`) and with staging off
(`--cow-staging 0`). Each takes a cow snapshot into a directory while its pass rate is
measured: the ratio is the share of the snapshot's wall time the guest ran at the rate it had in
the 2 s just before (the estimator of snapshot.py, with a no-snapshot control window in the same
VM). The load average is printed beside every row.

  scripts/bench/cow_speed.py [--quick] [SIZE ...]      # default 1G 4G; --quick: 256M
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

BASE_WINDOW_S = 2.0
WORKLOADS = [("10% working set", "arkvm.hot_pct=10"), ("full rewrite", "")]
STAGING = [("auto (default)", []), ("64M", ["--cow-staging", "64M"]),
           ("off", ["--cow-staging", "0"])]


def load():
    return "%.1f" % os.getloadavg()[0]


def one(s, size, cmdline, run_extra):
    sock = s.path(f"cow-{size}-{'-'.join(run_extra) or 'auto'}.sock")
    argv = [s.arkvm, "run", "--kernel", B.guest("memory"), "--memory", size,
            "--api-socket", sock] + run_extra + (["--cmdline", cmdline] if cmdline else [])
    vm = B.Proc(argv)
    try:
        first = vm.wait_line(r"^PASS ", timeout=300)
        if first is None or vm.wait_line(r"^PASS ", start=first + 3, timeout=300) is None:
            raise B.GuestLost(f"memory guest at {size}: {vm.lost() or 'no progress'}")
        # Control window: the same estimator over a window with no snapshot.
        time.sleep(BASE_WINDOW_S)
        c0 = time.perf_counter()
        time.sleep(1.0)
        c1 = time.perf_counter()
        time.sleep(BASE_WINDOW_S)
        t0 = time.perf_counter()
        load_at = load()
        out = s.path(f"snap-{size}")
        report, _, snap_argv, text = B.run_snapshot(s.arkvm, sock, out, [])
        t1 = time.perf_counter()
        B.drop_dir(out)
        time.sleep(1.5)
        if vm.lost():
            raise B.GuestLost(vm.lost())
        pts = B.passes(vm)
        base_c = B.pass_rate(pts, c0 - BASE_WINDOW_S, c0)
        base = B.pass_rate(pts, t0 - BASE_WINDOW_S, t0)
        return {
            "argv": argv, "snap_argv": snap_argv, "report": report, "text": text,
            "control": B.running_fraction(pts, c0, c1, base_c),
            "during": B.running_fraction(pts, t0, t1, base), "rate": base,
            "load": load_at, "torn": B.torn(vm),
        }
    finally:
        vm.stop(s.arkvm, sock)


def main():
    quick = B.quick_flag(sys.argv)
    sizes = [a for a in sys.argv[1:] if not a.startswith("--")] or (
        ["256M"] if quick else ["1G", "4G"])
    with B.Scratch("cow_speed") as s:
        B.heading("cow: guest speed during a live snapshot / just before, staging on and off")
        B.print_facts(B.machine_facts(s.dir), s)
        rows = []
        for size in sizes:
            for wname, cmdline in WORKLOADS:
                for sname, extra in STAGING:
                    r = B.retry(one, s, size, cmdline, extra)
                    B.show_command(r["argv"])
                    rep = r["report"] or {}
                    cow = rep.get("cow") or {}
                    rows.append([
                        size, wname, sname, B.fmt(r["during"], 2, "x"),
                        B.fmt(r["control"], 2, "x"), B.fmt(r["rate"], 1),
                        str(rep.get("pause_us", "n/a")), str(rep.get("total_ms", "n/a")),
                        str(cow.get("faults", "n/a")),
                        f"{cow.get('bytes_staged', 0) / 2**20:.0f}",
                        str(cow.get("pool_full", "n/a")),
                        f"{cow.get('writer_wait_us', 0) / 1000:.0f}",
                        r["load"], "YES" if r["torn"] else "no",
                    ])
                    if r["report"] is None:
                        B.note(f"snapshot failed: {r['text'][-200:]}")
        B.show_command(r["snap_argv"])
        print()
        B.table(["size", "workload", "staging", "during/before", "control", "passes/s before",
                 "pause us", "total ms", "faults", "MiB staged", "pool full", "writers waited ms",
                 "load", "TORN"], rows)
        B.note("during/before: the share of the snapshot's wall time the guest ran at its rate "
               "of the 2 s before; control: the same estimator over 1 s without a snapshot")
        B.note(f"load average at the end: {'%.2f %.2f %.2f' % os.getloadavg()}")


if __name__ == "__main__":
    main()
