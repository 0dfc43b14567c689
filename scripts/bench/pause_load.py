#!/usr/bin/env python3
"""cow pause, median and 95th percentile over 20 snapshots, idle and with two busy host threads
(issue 16), with the pause priority boost on and (under load) off (`ARKVM_PAUSE_BOOST=0`).

An idle memory guest (`arkvm.hot_pct=0`) takes 21 live cow backups into a repository; the
first (full) is left out, the next 20 are incremental, so each copies little while its pause
runs the same code as any cow snapshot's (save state, re-protect what was written, freeze the
disks). "Busy" runs two `python3 -c 'while True: pass'` processes for the whole VM's life.

  scripts/bench/pause_load.py [--quick] [SIZE ...]     # default 1G 4G; --quick: 256M
"""

import json
import os
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

SNAPSHOTS = 20
CONDITIONS = [("idle", 0, True), ("2 busy threads", 2, True), ("2 busy threads", 2, False)]
PHASES = re.compile(r"cow pause phases: (.*)")


def p95(values):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.95 * (len(v) - 1))))]


def one(s, size, busy, boost):
    repo = s.path(f"repo-{size}")
    sock = s.path(f"pause-{size}.sock")
    subprocess.run([s.arkvm, "backup", "init", "--repo", repo], check=True,
                   stdout=subprocess.DEVNULL)
    env = dict(os.environ)
    if not boost:
        env["ARKVM_PAUSE_BOOST"] = "0"
    argv = [s.arkvm, "--log-level", "info", "run", "--kernel", B.guest("memory"),
            "--memory", size, "--api-socket", sock, "--cmdline", "arkvm.hot_pct=0"]
    vm = B.Proc(argv, env=env)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    pauses, loads = [], []
    try:
        if vm.wait_line(r"^PASS ", timeout=600) is None:
            raise B.GuestLost(f"memory guest at {size}: {vm.lost() or 'no progress'}")
        snap = [s.arkvm, "snapshot", "--api-socket", sock, "--repo", repo, "--json"]
        for i in range(SNAPSHOTS + 1):
            r = subprocess.run(snap, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               timeout=1800)
            if r.returncode != 0:
                B.die(f"backup failed: {r.stderr.strip()[-300:]}")
            if i > 0:
                pauses.append(json.loads(r.stdout.strip().splitlines()[-1])["pause_us"])
                loads.append(os.getloadavg()[0])
        # Each snapshot's phases (`name_us=N ...`), the first (full) one left out.
        phases = [dict((k[:-3], int(v)) for k, v in (w.split("=") for w in m.group(1).split()))
                  for _, _, line in vm.lines("err") for m in [PHASES.search(line)] if m][1:]
        return {"argv": argv, "snap": snap, "pauses": pauses, "phases": phases,
                "load": statistics.mean(loads), "torn": B.torn(vm)}
    finally:
        for h in hogs:
            h.kill()
            h.wait()
        vm.stop(s.arkvm, sock)
        B.drop_dir(repo)


def main():
    quick = B.quick_flag(sys.argv)
    sizes = [a for a in sys.argv[1:] if not a.startswith("--")] or (
        ["256M"] if quick else ["1G", "4G"])
    with B.Scratch("pause_load") as s:
        B.heading(f"cow pause over {SNAPSHOTS} snapshots, idle and with two busy host threads")
        B.print_facts(B.machine_facts(s.dir), s)
        rows, phase_rows = [], []
        for size in sizes:
            for name, busy, boost in CONDITIONS:
                r = B.retry(one, s, size, busy, boost)
                names = list(r["phases"][0]) if r["phases"] else []
                phase_rows.append([size, name, "on" if boost else "off"] + [
                    f"{statistics.median(p[n] for p in r['phases']) / 1000:.2f} / "
                    f"{p95([p[n] for p in r['phases']]) / 1000:.2f}" for n in names])
                ms = [p / 1000 for p in r["pauses"]]
                rows.append([size, name, "on" if boost else "off (ARKVM_PAUSE_BOOST=0)",
                             f"{statistics.median(ms):.2f}", f"{p95(ms):.2f}",
                             f"{min(ms):.2f}", f"{max(ms):.2f}", f"{r['load']:.1f}",
                             "YES" if r["torn"] else "no"])
        B.show_command(r["argv"])
        B.show_command(r["snap"])
        print()
        B.table(["size", "host", "boost", "median ms", "p95 ms", "min ms", "max ms",
                 "load (mean)", "TORN"], rows)
        print()
        B.note("where the pause went, per phase: median / p95 ms (`cow pause phases:` log line)")
        B.table(["size", "host", "boost"] + names, phase_rows)
        B.note(f"load average at the end: {'%.2f %.2f %.2f' % os.getloadavg()}")


if __name__ == "__main__":
    main()
