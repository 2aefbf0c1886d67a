"""Where a benchmark's CPU went, by process and thread: a system-wide `perf record` read back.

    perf record -e cpu-clock -F 999 -a -o RUN.data -- sleep 60    # while the workers train
    python -m bench.thread_cpu RUN.data [--from 20 --to 44] [--top 3]

On hosts that share cores (the shaped cluster benchmark's: 4 hosts on 2 cores), any CPU a worker's
communication threads take is CPU its training thread does not get. This reads every sample of a
`perf record -a` (through `perf script`), keeps those between --from and --to seconds after the
first one (the steady steps, past start-up), and prints per process: the samples of its main thread
(the one whose id is the process's: training, and whatever the training loop itself does to
communicate), of each other thread by name, with each one's commonest symbols, and the machine's
idle samples. At the sampling rate F, samples / F are CPU seconds.

Each Python worker is a process named `python`; other processes (sshd, the launcher) are reported
only with --all.
"""
from __future__ import annotations

import collections
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hvdbert.errors import ArgumentParser, UsageError, cli_entry

# `perf script` fields this reads: "COMM PID/TID TIME: IP SYMBOL+OFFSET (DSO)"
PERF_FIELDS = "comm,pid,tid,time,ip,sym,dso"


@dataclass
class Sample:
    time: float
    comm: str
    pid: int
    tid: int
    symbol: str


@dataclass
class ProcessCpu:
    pid: int
    main: int = 0
    threads: dict[tuple[int, str], collections.Counter] = field(default_factory=dict)  # (tid, comm): symbols

    def other(self) -> int:
        return sum(sum(symbols.values()) for symbols in self.threads.values())


def parse_perf_script(lines) -> list[Sample]:
    """The samples of `perf script -F comm,pid,tid,time,ip,sym,dso` output (a line each)."""
    samples = []
    for line in lines:
        parts = line.split()
        # the command name may hold spaces: the PID/TID field is the first with a slash and digits
        at = next((i for i, part in enumerate(parts) if "/" in part and part.replace("/", "").isdigit()), None)
        if at is None or at + 1 >= len(parts) or not parts[at + 1].endswith(":"):
            continue
        pid, tid = (int(n) for n in parts[at].split("/"))
        symbol = parts[at + 3].split("+")[0] if len(parts) > at + 3 else "?"
        samples.append(Sample(float(parts[at + 1].rstrip(":")), " ".join(parts[:at]), pid, tid, symbol))
    return samples


def thread_cpu(samples: list[Sample], start: float, end: float | None, everything: bool = False
               ) -> tuple[dict[int, ProcessCpu], int, int]:
    """Per process (python workers; every process with `everything`), its main thread's samples and
    each other thread's symbols, over [start, end) seconds after the first sample; with the idle
    samples and the window's total."""
    if not samples:
        return {}, 0, 0
    first = samples[0].time
    window = [s for s in samples if s.time - first >= start and (end is None or s.time - first < end)]
    # the workers: processes whose main thread is python (not sshd, not the launcher), unless asked for all
    workers = {s.pid for s in window if s.pid == s.tid and (everything or s.comm == "python")} - {0}
    processes = {pid: ProcessCpu(pid) for pid in workers}
    for s in window:
        if s.pid not in processes:
            continue
        process = processes[s.pid]
        if s.tid == s.pid:
            process.main += 1
        else:
            process.threads.setdefault((s.tid, s.comm), collections.Counter())[s.symbol] += 1
    return processes, sum(s.pid == 0 for s in window), len(window)


def report(processes: dict[int, ProcessCpu], idle: int, total: int, top: int) -> str:
    lines = [f"{total} samples in the window, {idle} idle ({idle / max(total, 1):.1%})", "",
             "| process | main thread | other threads | other threads: the busiest, with their commonest symbols |",
             "|---:|---:|---:|---|"]
    for p in sorted(processes.values(), key=lambda p: -p.main):
        busiest = sorted(p.threads.items(), key=lambda item: -sum(item[1].values()))[:top]
        named = "; ".join(f"{comm} {tid}: {sum(symbols.values())} ("
                          + ", ".join(f"{name} {n}" for name, n in symbols.most_common(top)) + ")"
                          for (tid, comm), symbols in busiest)
        lines.append(f"| {p.pid} | {p.main} | {p.other()} | {named} |")
    mains = sum(p.main for p in processes.values())
    others = sum(p.other() for p in processes.values())
    lines += ["", f"all main threads {mains} samples, all other threads {others} "
                  f"({others / max(mains + others, 1):.1%} of the workers' samples)"]
    return "\n".join(lines)


def read_perf_data(path: Path) -> list[Sample]:
    if not path.is_file():
        raise UsageError(f"{path}: no such file; give the output of perf record -a (its -o)")
    if shutil.which("perf") is None:
        raise UsageError("perf is not installed: install linux-perf (Debian) or linux-tools (Ubuntu)")
    result = subprocess.run(["perf", "script", "-i", str(path), "-F", PERF_FIELDS], capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise UsageError(f"{path}: perf script could not read it: {said}")
    return parse_perf_script(result.stdout.splitlines())


@cli_entry("bench.thread_cpu")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.thread_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="perf.data of a system-wide perf record (-a)")
    parser.add_argument("--from", dest="start", type=float, default=0.0,
                        help="seconds after the first sample where the window starts (default 0)")
    parser.add_argument("--to", dest="end", type=float, default=None,
                        help="seconds after the first sample where it ends (default: the last sample)")
    parser.add_argument("--top", type=int, default=3, help="threads and symbols named per process (default 3)")
    parser.add_argument("--all", action="store_true", help="every process, not only the python workers")
    args = parser.parse_args(argv)
    if args.end is not None and args.end <= args.start:
        raise UsageError(f"--to {args.end:g} is not after --from {args.start:g}: give a window of positive length")
    processes, idle, total = thread_cpu(read_perf_data(args.data), args.start, args.end, args.all)
    print(report(processes, idle, total, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
