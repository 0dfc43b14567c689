#!/usr/bin/env python3
"""Snapshot benchmark (issues 4 and 5): vCPU pause, throughput against dd, guest pass rate.

For each memory size the memory guest runs while snapshots are taken of it: live copy-on-write
(the default), `--paused` and `--strategy precopy` with every page rewritten every pass (the
hardest case: the guest writes far faster than any copy), then copy-on-write again with a 10%
working set (`arkvm.hot_pct=10`). Reported per snapshot:
- the vCPU pause and total time, from arkvm's JSON report;
- the write throughput as a ratio to `dd if=/dev/zero of=<same dir> bs=1M count=<same MiB>
  conv=fsync`, run just before that snapshot while the same guest runs;
- the share of the snapshot's wall time the guest ran at its normal pass rate (its pass rate
  during the snapshot as a ratio to its rate without one). A control row ("none") applies the
  same estimator to a window with no snapshot, to show its noise.
"""

import sys
import time

import benchlib as B

SIZES_FULL = [("256M", 256), ("1G", 1024), ("2G", 2048), ("4G", 4096)]
SIZES_QUICK = [("256M", 256)]
ALL_MODES = [("none", None), ("cow", []), ("paused", ["--paused"]),
             ("precopy", ["--strategy", "precopy"])]
BASE_WINDOW_S = 2.0
# A guest with a working set: after its hot pages are copied once it runs unhindered.
HOT = "arkvm.hot_pct=10"


def start_guest(s, size, cmdline):
    sock = s.path(f"api-{size}.sock")
    argv = [s.arkvm, "--log-level", "info", "run", "--kernel", B.guest("memory"),
            "--memory", size, "--api-socket", sock] + (["--cmdline", cmdline] if cmdline else [])
    vm = B.Proc(argv)
    # Steady state: pass 1 (first touch of every page) is over and a few more lines came.
    first = vm.wait_line(r"^PASS ", timeout=180)
    if first is None or vm.wait_line(r"^PASS ", start=first + 3, timeout=180) is None:
        reason = vm.lost() or f"no progress: {vm.stderr_text()[-400:]}"
        vm.stop()
        raise B.GuestLost(f"memory guest at {size}: {reason}")
    return vm, sock, argv


def bench_guest(s, size, mib, modes, cmdline):
    """Boots one memory guest and takes the given snapshots of it, one after the other."""
    rows = []
    vm, sock, vm_argv = start_guest(s, size, cmdline)
    commands = [vm_argv]
    dd_argv = None
    control_s = 1.0
    for name, extra in modes:
        row = {"mode": name}
        rows.append(row)
        if extra is not None:
            row["dd"], dd_argv = B.dd_write(s.path("dd.bin"), mib)
        time.sleep(BASE_WINDOW_S)
        t0 = time.perf_counter()
        if extra is None:
            time.sleep(control_s)
        else:
            out = s.path(f"snap-{size}-{name}")
            report, wall, argv, text = B.run_snapshot(s.arkvm, sock, out, extra)
            commands.append(argv)
            B.drop_dir(out)
            if report is None:
                row["error"] = text.splitlines()[-1] if text else "failed"
                continue
            row.update(report)
            row["mode"] = name
        t1 = time.perf_counter()
        row["window"] = (t0, t1)
        row["rate_before"] = B.pass_rate(B.passes(vm), t0 - BASE_WINDOW_S, t0)
    time.sleep(1.0)
    if vm.lost():
        raise B.GuestLost(f"memory guest at {size} during the snapshots: {vm.lost()}")
    pts = B.passes(vm)
    for row in rows:
        if "window" in row:
            t0, t1 = row.pop("window")
            row["running"] = B.running_fraction(pts, t0, t1, row["rate_before"])
    status = vm.stop(s.arkvm, sock)
    return {"rows": rows, "dd_argv": dd_argv, "commands": commands, "status": status,
            "torn": B.torn(vm)}


def print_result(size, what, r, dd_best):
    print(f"\n### {size}, {what}\n")
    for c in r["commands"]:
        B.show_command(c)
    if r["dd_argv"]:
        B.show_command(r["dd_argv"])
    B.note(f"guest exit status {r['status']}; TORN or fault: {'YES' if r['torn'] else 'no'}")
    print()
    rows = []
    for row in r["rows"]:
        ratio = row.get("running")
        during = ratio * row["rate_before"] if ratio is not None else None
        if row["mode"] == "none":
            rows.append(["none (control)", "-", "-", "-", "-", "-", "-",
                         B.fmt(row["rate_before"], 1), B.fmt(during, 1),
                         B.fmt(ratio, 2, "x")])
            continue
        if row.get("error") or row.get("total_ms") is None:
            rows.append([row["mode"]] + ["n/a"] * 8 + [str(row.get("error"))[:70]])
            continue
        secs = row["total_ms"] / 1e3 if row.get("total_ms") else None
        tput = row["bytes_written"] / secs if secs else None
        extra = (f"early={row['pages_copied_early']}" if row["mode"] == "cow" else
                 f"recopied={row['pages_recopied']} rounds={row['precopy_rounds']}"
                 if row["mode"] == "precopy" else "")
        rows.append([row["mode"], str(row["pause_us"]), str(row["total_ms"]),
                     f"{row['bytes_written'] / 2**20:.0f}",
                     B.fmt(tput / 1e6 if tput else None, 0), B.fmt(row["dd"] / 1e6, 0),
                     B.fmt(tput / dd_best if tput else None, 2, "x"),
                     B.fmt(row["rate_before"], 1), B.fmt(during, 1),
                     B.fmt(ratio, 2, "x") + (f" {extra}" if extra else "")])
    B.table(["mode", "pause us", "total ms", "MiB written", "MB/s", "dd MB/s", "vs best dd",
             "passes/s before", "passes/s during", "during/before, pages"], rows)


def main():
    quick = B.quick_flag(sys.argv)
    sizes = SIZES_QUICK if quick else SIZES_FULL
    with B.Scratch("snapshot") as s:
        B.heading("snapshot: vCPU pause, throughput vs dd, guest pass rate (memory guest)")
        B.print_facts(B.machine_facts(s.dir), s)
        for size, mib in sizes:
            full = B.retry(bench_guest, s, size, mib, ALL_MODES, None)
            hot = B.retry(bench_guest, s, size, mib, [("cow", [])], HOT)
            # The physical limit seen in this run: the best of this size's dd runs (a single
            # dd on this shared disk varied from about 70 to 1600 MB/s).
            dd_best = max(row["dd"] for row in full["rows"] + hot["rows"] if "dd" in row)
            print_result(size, "every page rewritten every pass", full, dd_best)
            print_result(size, "10% of the pages rewritten (" + HOT + ")", hot, dd_best)
            B.note(f"best dd of {size} in this run: {dd_best / 1e6:.0f} MB/s")
        print()
        B.note("pause us / total ms / MiB written: arkvm's JSON report (precopy writes re-copied "
               "pages again); MB/s = MiB written / total ms; dd MB/s: the dd command above for "
               "the same MiB, run just before that snapshot")
        B.note(f"passes/s before: from the memory guest's host-timestamped PASS lines in the "
               f"{BASE_WINDOW_S:.0f} s before the snapshot; during/before: the share of the "
               "snapshot's wall time the guest ran at that rate (the time its passes fell "
               "short between the PASS lines around the snapshot, charged to the snapshot)")
        B.note(f"load average at the end: {'%.2f %.2f %.2f' % __import__('os').getloadavg()}")


if __name__ == "__main__":
    main()
