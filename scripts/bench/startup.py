#!/usr/bin/env python3
"""Start-up benchmark (issue 2): process start to the guest's first serial byte.

Boots the marker guest at 256 MiB and 4 GiB, interleaved, N times each. The time is taken from
outside: perf_counter just before Popen, and again when the first byte arrives on the child's
stdout pipe. The setup breakdown comes from arkvm's `boot timings:` log line. The baseline in the
same run is the spawn-to-exit time of `arkvm --version` (exec, dynamic linking, argument parsing),
the part of start-up that any process pays.
"""

import os
import subprocess
import sys
import time

import benchlib as B

SIZES = ["256M", "4G"]


def one_boot(arkvm, kernel, memory):
    argv = [arkvm, "--log-level", "info", "run", "--kernel", kernel, "--memory", memory]
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    first = os.read(p.stdout.fileno(), 1)
    t_first = time.perf_counter()
    rest, err = p.communicate(timeout=60)
    t_exit = time.perf_counter()
    out = (first + rest).decode(errors="replace")
    timings = B.parse_boot_timings(err.decode(errors="replace").splitlines())
    ok = p.returncode == 0 and "ARKVM-MARKER-OK" in out and timings is not None
    if not ok:
        B.die(f"marker boot failed (status {p.returncode}): {out!r} {err.decode()[-500:]!r}")
    return argv, (t_first - t0) * 1e3, (t_exit - t0) * 1e3, timings


def spawn_exit_ms(argv):
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return (time.perf_counter() - t0) * 1e3


def main():
    quick = B.quick_flag(sys.argv)
    reps = 3 if quick else 11
    with B.Scratch("startup") as s:
        B.heading("start-up: process start to first serial byte (marker guest)")
        B.print_facts(B.machine_facts(s.dir), s)
        kernel = B.guest("marker")
        one_boot(s.arkvm, kernel, "256M")  # warm the page cache for binary and guest
        res = {m: [] for m in SIZES}
        base = []
        for _ in range(reps):
            base.append(spawn_exit_ms([s.arkvm, "--version"]))
            for m in SIZES:
                argv, first_ms, exit_ms, t = one_boot(s.arkvm, kernel, m)
                res[m].append((first_ms, exit_ms, t))
        B.note(f"{reps} runs per size, interleaved; median [min-max] in ms")
        B.show_command(argv[:-1] + ["<256M|4G>"])
        B.show_command([s.arkvm, "--version"] + ["   (baseline: spawn to exit)"])
        print()
        rows = []
        med_first = {}
        base_med = B.stats(base)[0]
        for m in SIZES:
            first = [r[0] for r in res[m]]
            med_first[m] = B.stats(first)[0]
            col = {k: [r[2][k] / 1e3 for r in res[m]] for k in res[m][0][2]}
            setup = [sum(r[2].values()) / 1e3 for r in res[m]]
            rest = [r[0] - sum(r[2].values()) / 1e3 for r in res[m]]
            rows.append([m, B.fmt_stats(first), B.fmt_stats(col["create_vm_us"]),
                         B.fmt_stats(col["memory_us"]), B.fmt_stats(col["load_us"]),
                         B.fmt_stats(col["vcpus_us"]), B.fmt_stats(setup), B.fmt_stats(rest),
                         B.fmt_stats([r[1] for r in res[m]]),
                         B.fmt(med_first[m] / base_med, 1, "x")])
        B.table(["memory", "first byte", "create_vm", "memory", "load", "vcpus", "setup sum",
                 "other", "exit", "vs --version"], rows)
        print()
        B.note(f"baseline `arkvm --version` spawn-to-exit: {B.fmt_stats(base, digits=2)} ms")
        B.note(f"4G / 256M first-byte ratio: {med_first['4G'] / med_first['256M']:.2f}")
        B.note("'other' = first byte - setup sum: exec and dynamic linking, CLI, devices, the vCPU "
               "thread, the first guest entry and the guest's CPL0 prologue up to its first 'out'")


if __name__ == "__main__":
    main()
