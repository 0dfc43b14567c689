#!/usr/bin/env python3
"""Restore benchmark (issue 4): restore to first guest progress, at 256 MiB and 2 GiB.

The memory guest runs at each size and several live snapshots are taken of it a moment apart
(so the guest sits at different points of its print interval), then it is shut down. Each
snapshot is restored a few times in a fresh `arkvm restore` process. Measured from outside,
perf_counter just before Popen:
- vCPUs running: the wall-clock stamp of arkvm's `guest running` log line (the closest outside
  view of the first guest instruction), minus the spawn time;
- first PASS: when the first PASS line of the restored guest reaches its stdout pipe (the guest
  prints about every million page visits, so this includes up to one print interval of work
  plus the demand faults of its working set);
- fully loaded: the stamp of `guest memory fully loaded` (background prefetch done), next to
  `dd` reading the same memory file in the same run.
The headline ratio is 2 GiB over 256 MiB (the goal: within 1.5x, under 20 ms).
"""

import os
import subprocess
import sys
import time

import benchlib as B

SIZES = [("256M", 256), ("2G", 2048)]
# The guest's working set: 64 MiB whatever the memory size (the restore-time figure), then all
# of memory (the first PASS then needs every page faulted in or prefetched).
WORKLOADS = [("64 MiB working set", "arkvm.region_mb=64"), ("whole memory rewritten", None)]


def take_snapshots(s, size, count, cmdline):
    sock = s.path(f"src-{size}.sock")
    argv = [s.arkvm, "--log-level", "info", "run", "--kernel", B.guest("memory"),
            "--memory", size, "--api-socket", sock] + (["--cmdline", cmdline] if cmdline else [])
    vm = B.Proc(argv)
    first = vm.wait_line(r"^PASS ", timeout=180)
    if first is None or vm.wait_line(r"^PASS ", start=first + 2, timeout=180) is None:
        reason = vm.lost() or f"no progress: {vm.stderr_text()[-400:]}"
        vm.stop()
        raise B.GuestLost(f"memory guest at {size}: {reason}")
    dirs = []
    snap_argv = None
    for i in range(count):
        out = s.path(f"snap-{size}-{i}")
        report, _, snap_argv, text = B.run_snapshot(s.arkvm, sock, out, [])
        if report is None:
            reason = vm.lost() or text[-300:]
            vm.stop(s.arkvm, sock)
            for d in dirs + [out]:
                B.drop_dir(d)
            raise B.GuestLost(f"snapshot at {size} failed: {reason}")
        dirs.append(out)
        time.sleep(0.37 * (i + 1))
    vm.stop(s.arkvm, sock)
    if B.torn(vm):
        B.die(f"the source guest at {size} printed TORN or faulted")
    return dirs, [argv, snap_argv]


def one_restore(s, snap, size):
    sock = s.path(f"restore-{size}.sock")
    argv = [s.arkvm, "--log-level", "info", "restore", "--from", snap, "--api-socket", sock]
    p = B.Proc(argv)
    i = p.wait_line(r"^PASS ", timeout=60)
    first_pass = (p.out[i][0] - p.t0) * 1e3 if i is not None else None
    j = p.wait_line(r"guest memory fully loaded", stream="err", timeout=120)
    err = p.lines("err")
    loaded = None
    if j is not None:
        loaded = (B.log_walltime(err[j][2]) - p.wall0) * 1e3
    running = None
    for _, _, line in err:
        if "guest running" in line:
            running = (B.log_walltime(line) - p.wall0) * 1e3
            break
    timings = B.parse_boot_timings(line for _, _, line in err)
    lost = p.lost()
    status = p.stop(s.arkvm, sock)
    ok = status == 0 and first_pass is not None and not B.torn(p)
    if lost and not B.torn(p):
        raise B.GuestLost(f"restore of {snap}: {lost}")
    if not ok:
        print(f"  restore of {snap} failed (status {status}):\n{p.stderr_text()[-800:]}")
    return argv, {"first_pass": first_pass, "running": running, "loaded": loaded,
                  "timings": timings, "ok": ok}


def dd_read_ms(path):
    argv = ["dd", f"if={path}", "of=/dev/null", "bs=1M"]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - t0) * 1e3, argv


def bench_workload(s, what, cmdline, snaps, reps):
    print(f"\n### {what}" + (f" ({cmdline})" if cmdline else "") + "\n")
    res = {}
    for size, _ in SIZES:
        dirs, cmds = B.retry(take_snapshots, s, size, snaps, cmdline)
        runs = []
        for d in dirs:
            for _ in range(reps):
                argv, r = B.retry(one_restore, s, d, size)
                runs.append(r)
        dd_ms, dd_argv = dd_read_ms(os.path.join(dirs[0], "memory"))
        res[size] = (runs, dd_ms)
        for c in cmds + [argv, dd_argv]:
            B.show_command(c)
        for d in dirs:
            B.drop_dir(d)
    print()
    B.note(f"{snaps} snapshots x {reps} restores per size; median [min-max] in ms; "
           "snapshot files were just written, so they are in the page cache")
    print()
    rows = []
    med = {}
    for size, _ in SIZES:
        runs, dd_ms = res[size]
        good = [r for r in runs if r["ok"]]
        t = {k: [r["timings"][k] / 1e3 for r in good if r["timings"]]
             for k in ("create_vm_us", "memory_us", "load_us", "vcpus_us")}
        med[size] = {k: (B.stats([r[k] for r in good]) or (None,))[0]
                     for k in ("running", "first_pass", "loaded")}
        rows.append([size, f"{len(good)}/{len(runs)}",
                     B.fmt_stats([r["running"] for r in good]),
                     B.fmt_stats([r["first_pass"] for r in good]),
                     B.fmt_stats(t["create_vm_us"]), B.fmt_stats(t["memory_us"]),
                     B.fmt_stats(t["load_us"]), B.fmt_stats(t["vcpus_us"]),
                     B.fmt_stats([r["loaded"] for r in good], digits=0),
                     f"{dd_ms:.0f}"])
    B.table(["memory", "ok", "vCPUs running", "first PASS", "create_vm", "memory",
             "load (state)", "vcpus", "fully loaded", "dd read of memory file"], rows)
    print()
    for k, label in (("running", "vCPUs running"), ("first_pass", "first PASS")):
        a, b = med["256M"][k], med["2G"][k]
        B.note(f"2G / 256M, {label}: " + (f"{b / a:.2f}" if a and b else "n/a"))


def main():
    quick = B.quick_flag(sys.argv)
    snaps, reps = (1, 2) if quick else (3, 2)
    with B.Scratch("restore") as s:
        B.heading("restore: new process to first guest progress (memory guest)")
        B.print_facts(B.machine_facts(s.dir), s)
        for what, cmdline in (WORKLOADS[:1] if quick else WORKLOADS):
            bench_workload(s, what, cmdline, snaps, reps)
        print()
        B.note("create_vm / memory / load / vcpus: from the restored process's `boot timings:` "
               "line; fully loaded: its `guest memory fully loaded` line")


if __name__ == "__main__":
    main()
