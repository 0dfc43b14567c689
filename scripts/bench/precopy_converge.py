#!/usr/bin/env python3
"""Pre-copy against a full-speed writer (issue 16): does it converge, with and without the vCPU
throttle (auto-converge, `docs/precopy.md`)?

For each memory size and each setting (`ARKVM_PRECOPY_THROTTLE=on`, then `off`, each in its own
VM, one after the other in the same run) the memory guest rewrites every page at full speed
(`arkvm.hot_pct=100 arkvm.rate_pages=0`) and one `arkvm snapshot --strategy precopy` is taken.
Reported from arkvm's JSON report: converged or not, rounds, throttle applied, final dirty set,
final pause, total time, plus the guest's pass rate during the snapshot against just before.
Usage: precopy_converge.py [--quick] [--sizes 256M,1G] [--repeat N]
"""

import os
import sys
import time

import benchlib as B

CMDLINE = "arkvm.hot_pct=100 arkvm.rate_pages=0"
BASE_WINDOW_S = 2.0


def arg(name, default):
    if name in sys.argv[1:]:
        i = sys.argv.index(name)
        if i + 1 < len(sys.argv):
            return sys.argv[i + 1]
    return default


def one(s, size, throttle, n):
    sock = s.path(f"api-{size}-{throttle}-{n}.sock")
    env = dict(os.environ, ARKVM_PRECOPY_THROTTLE=throttle)
    argv = [s.arkvm, "--log-level", "info", "run", "--kernel", B.guest("memory"),
            "--memory", size, "--api-socket", sock, "--cmdline", CMDLINE]
    vm = B.Proc(argv, env=env)
    first = vm.wait_line(r"^PASS ", timeout=180)
    if first is None or vm.wait_line(r"^PASS ", start=first + 3, timeout=180) is None:
        reason = vm.lost() or f"no progress: {vm.stderr_text()[-400:]}"
        vm.stop()
        raise B.GuestLost(f"memory guest at {size}: {reason}")
    time.sleep(BASE_WINDOW_S)
    t0 = time.perf_counter()
    out = s.path(f"snap-{size}-{throttle}-{n}")
    report, wall, snap_argv, text = B.run_snapshot(
        s.arkvm, sock, out, ["--strategy", "precopy"])
    t1 = time.perf_counter()
    B.drop_dir(out)
    time.sleep(1.0)
    pts = B.passes(vm)
    base = B.pass_rate(pts, t0 - BASE_WINDOW_S, t0)
    running = B.running_fraction(pts, t0, t1, base)
    torn = B.torn(vm)
    vm.stop(s.arkvm, sock)
    return {"env": f"ARKVM_PRECOPY_THROTTLE={throttle}", "argv": argv, "snap": snap_argv,
            "report": report, "error": None if report else (text.splitlines() or ["?"])[-1],
            "running": running, "torn": torn, "load": "%.2f" % os.getloadavg()[0]}


def main():
    quick = B.quick_flag(sys.argv)
    sizes = arg("--sizes", "256M" if quick else "256M,1G").split(",")
    repeat = int(arg("--repeat", "1" if quick else "2"))
    with B.Scratch("precopy-converge") as s:
        B.heading("precopy against a full-speed writer: throttle on and off")
        B.print_facts(B.machine_facts(s.dir), s)
        rows = []
        shown = False
        for size in sizes:
            for n in range(repeat):
                for throttle in ("on", "off"):
                    r = B.retry(one, s, size, throttle, n)
                    if not shown:
                        B.show_command([r["env"]] + r["argv"])
                        B.show_command(r["snap"])
                        shown = True
                    rep = r["report"]
                    if rep is None:
                        rows.append([size, throttle] + ["n/a"] * 8 + [str(r["error"])[:60]])
                        continue
                    pc = rep.get("precopy") or {}
                    rows.append([
                        size, throttle, "yes" if rep.get("precopy_converged") else "NO",
                        str(rep.get("precopy_rounds")), f"{pc.get('throttle_pct', 0)}%",
                        f"{pc.get('final_dirty_bytes', 0) / 2**20:.0f}",
                        f"{(rep.get('pause_us') or 0) / 1e3:.1f}", str(rep.get("total_ms")),
                        f"{rep.get('bytes_written', 0) / 2**20:.0f}",
                        B.fmt(r["running"], 2, "x"),
                        ("TORN " if r["torn"] else "") + r["load"]])
        print()
        B.table(["size", "throttle", "converged", "rounds", "throttle applied",
                 "final dirty MiB", "final pause ms", "total ms", "MiB written",
                 "guest during/before", "load (1 min)"], rows)
        print()
        B.note("converged/rounds/throttle/final dirty/final pause/total/MiB written: arkvm's "
               "JSON report; guest during/before: the share of the snapshot's wall time the "
               "guest ran at its pass rate of the 2 s before (benchlib.running_fraction)")
        B.note(f"load average at the end: {'%.2f %.2f %.2f' % os.getloadavg()}")


if __name__ == "__main__":
    main()
