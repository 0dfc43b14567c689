#!/usr/bin/env python3
"""Recovery benchmark (issue 11, memory side): process start to the guest's first new console
output, restoring one backup point of the memory guest at 256 MiB and 4 GiB, straight from the
repository (`restore --repo R --id ID`) and from a snapshot directory of the same guest state.

The memory guest runs with `arkvm.hot_pct=1 arkvm.interval=1` (every page written once, then
a PASS line for every pass over 1% of memory plus a rotating 1% window). It is paused, and
while paused a backup point and a snapshot directory are taken (so both hold the same memory),
then it is shut down. Each is restored several times, alternately, each in a fresh process.
Measured from outside, perf_counter just before Popen, to the first PASS line on the restored
process's stdout. Also shown: how much memory the loader had filled at that moment
(`memory_loader.bytes_loaded_at_first_output` of `GET /vm`).

Headline ratios: 4G / 256M from the repository (goal <= 1.5), and repository / directory at each
size (goal <= 2).
"""

import json
import subprocess
import sys

import benchlib as B

SIZES = ["256M", "4G"]
CMDLINE = "arkvm.hot_pct=1 arkvm.interval=1"


def take_point(s, size):
    """Returns (repo, point id, snapshot dir, commands)."""
    repo = s.path(f"repo-{size}")
    init = [s.arkvm, "backup", "init", "--repo", repo]
    subprocess.run(init, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sock = s.path(f"src-{size}.sock")
    argv = [s.arkvm, "run", "--kernel", B.guest("memory"), "--memory", size,
            "--api-socket", sock, "--cmdline", CMDLINE]
    vm = B.Proc(argv)
    first = vm.wait_line(r"^PASS ", timeout=300)
    if first is None:
        reason = vm.lost() or f"no progress: {vm.stderr_text()[-400:]}"
        vm.stop()
        raise B.GuestLost(f"memory guest at {size}: {reason}")
    pause = [s.arkvm, "pause", "--api-socket", sock]
    subprocess.run(pause, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    backup = [s.arkvm, "snapshot", "--api-socket", sock, "--repo", repo, "--json"]
    r = subprocess.run(backup, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=900)
    report = next((json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")), None)
    if r.returncode != 0 or report is None or report.get("state") != "done":
        vm.stop(s.arkvm, sock)
        B.die(f"backup at {size} failed: {(r.stdout + r.stderr)[-400:]}")
    snap = s.path(f"snap-{size}")
    sreport, _, snap_argv, text = B.run_snapshot(s.arkvm, sock, snap, [])
    if sreport is None:
        vm.stop(s.arkvm, sock)
        B.die(f"snapshot at {size} failed: {text[-400:]}")
    vm.stop(s.arkvm, sock)
    if B.torn(vm):
        B.die(f"the source guest at {size} printed TORN or faulted")
    return repo, report["id"], snap, [init, argv, pause, backup, snap_argv]


def loader_info(s, sock):
    r = subprocess.run([s.arkvm, "status", "--api-socket", sock, "--json"],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=60)
    try:
        return json.loads(r.stdout)["vm"].get("memory_loader") or {}
    except (ValueError, KeyError):
        return {}


def one_restore(s, size, source):
    sock = s.path(f"restore-{size}.sock")
    argv = [s.arkvm, "restore"] + source + ["--api-socket", sock]
    p = B.Proc(argv)
    i = p.wait_line(r"^PASS ", timeout=120)
    first = (p.out[i][0] - p.t0) * 1e3 if i is not None else None
    info = loader_info(s, sock) if i is not None else {}
    status = p.stop(s.arkvm, sock)
    ok = first is not None and not B.torn(p) and status in (0, None)
    if not ok:
        print(f"  restore {' '.join(source)} failed (status {status}):\n"
              f"{p.stderr_text()[-800:]}")
    at_first = info.get("bytes_loaded_at_first_output")
    return argv, {"first": first, "ok": ok,
                  "loaded_pct": 100.0 * at_first / info["bytes_total"]
                  if at_first is not None and info.get("bytes_total") else None}


def main():
    quick = B.quick_flag(sys.argv)
    reps = 2 if quick else 5
    with B.Scratch("recovery") as s:
        B.heading("recovery: process start to first new console output (memory guest)")
        B.print_facts(B.machine_facts(s.dir), s)
        res = {}
        for size in SIZES:
            repo, pid, snap, cmds = take_point(s, size)
            sources = {"repository": ["--repo", repo, "--id", pid], "directory": ["--from", snap]}
            runs = {k: [] for k in sources}
            for _ in range(reps):
                for kind, src in sources.items():
                    argv, r = one_restore(s, size, src)
                    runs[kind].append(r)
                    cmds.append(argv)
            res[size] = runs
            for c in cmds[:5] + cmds[-2:]:
                B.show_command(c)
            B.drop_dir(repo)
            B.drop_dir(snap)
        print()
        B.note(f"{reps} restores per size and source, alternating; median [min-max] in ms; "
               f"load at the end: {'%.2f %.2f %.2f' % __import__('os').getloadavg()}")
        print()
        rows = []
        med = {}
        for size in SIZES:
            for kind in ("repository", "directory"):
                good = [r for r in res[size][kind] if r["ok"]]
                med[(size, kind)] = (B.stats([r["first"] for r in good]) or (None,))[0]
                pcts = [r["loaded_pct"] for r in good if r["loaded_pct"] is not None]
                rows.append([size, kind, f"{len(good)}/{len(res[size][kind])}",
                             B.fmt_stats([r["first"] for r in good]),
                             B.fmt_stats(pcts, digits=2)])
        B.table(["memory", "from", "ok", "first output (ms)",
                 "% of memory loaded at first output"], rows)
        print()

        def ratio(a, b):
            return f"{a / b:.2f}" if a and b else "n/a"
        for kind in ("repository", "directory"):
            B.note(f"4G / 256M, {kind}: {ratio(med[('4G', kind)], med[('256M', kind)])}")
        for size in SIZES:
            B.note(f"repository / directory, {size}: "
                   f"{ratio(med[(size, 'repository')], med[(size, 'directory')])}")


if __name__ == "__main__":
    main()
