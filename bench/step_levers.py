"""The step's levers on CPU, one at a time: hvdbert and transformers' Trainer given the same lever.

    python -m bench.step_levers --recipe bench/recipes/bert-mini-cpu.toml --output docs/bench/step-levers

Every lever set (`--lever NAME=SECTION.KEY=VALUE[,SECTION.KEY=VALUE]`, repeatable; the default set
below) runs as one `python -m hvdbert.bench --workers 1 --peers hf --set ...`, so hvdbert and the
Trainer (run_mlm.py's recipe) run the same step with it: the recipe's bf16 autocast is the
Trainer's `bf16`, train.compile its `torch_compile`, the model's dropout its config. `--rounds R`
runs every set R times, in alternate order (ABBA: a drifting load hits every set alike). Per round
each system's CPU-seconds per step are divided by that system's baseline of the same round (its
speed-up from the lever) and hvdbert's by the Trainer's (the step-cost ratio); the table gives the
median and the range over rounds. Writes levers.json and levers.md to --output.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hvdbert.errors import ArgumentParser, UsageError, cli_entry

# What hvdbert.bench's CPU defaults leave as they are: fp32, eager, dropout 0.1 in attention too.
DEFAULT_LEVERS = [
    "baseline=",
    "bf16=train.precision=bf16",
    "compile=train.compile=true",
    "no attention dropout=model.attention_probs_dropout_prob=0.0",
    "bf16, no attention dropout=train.precision=bf16,model.attention_probs_dropout_prob=0.0",
]
SYSTEMS = {"hvdbert": "hvdbert", "hf": "Trainer"}


def parse_levers(specs: list[str]) -> list[tuple[str, list[str]]]:
    levers = []
    for spec in specs:
        name, _, sets = spec.partition("=")
        if not name:
            raise UsageError(f"--lever {spec!r}: expected NAME=SECTION.KEY=VALUE[,SECTION.KEY=VALUE]")
        levers.append((name, [s for s in sets.split(",") if s]))
    if levers[0][1]:
        raise UsageError("the first --lever is the baseline the others are divided by: give it no settings "
                         "(--lever baseline=)")
    return levers


def measure(args, sets: list[str], out: Path) -> dict[str, float]:
    """One hvdbert.bench run of both systems with `sets`: CPU-seconds per step by system."""
    command = [sys.executable, "-m", "hvdbert.bench", "--recipe", str(args.recipe), "--peers", "hf",
               "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--output", str(out),
               *(a for s in [*args.set, *sets] for a in ("--set", s))]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    rows = json.loads((out / "bench.json").read_text())["rows"]
    return {r["system"]: r["cpu_seconds_per_step"] for r in rows if r["system"] in SYSTEMS}


def summarise(levers: list[tuple[str, list[str]]], rounds: list[dict[str, dict[str, float]]]) -> list[dict]:
    rows = []
    for name, sets in levers:
        per_round = [r[name] for r in rounds]
        row = {"lever": name, "sets": sets, "cpu_seconds_per_step": {}, "speedup": {}, "ratio": {}}
        for system in SYSTEMS:
            row["cpu_seconds_per_step"][system] = [r[system] for r in per_round]
            row["speedup"][system] = [r[levers[0][0]][system] / r[name][system] for r in rounds]
        row["ratio"]["hvdbert/hf"] = [r["hvdbert"] / r["hf"] for r in per_round]
        rows.append(row)
    return rows


def cell(values: list[float], digits: int = 2, unit: str = "") -> str:
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.{digits}f}{unit}"
    return f"{median:.{digits}f}{unit} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(args, rows: list[dict], seconds: float) -> str:
    lines = ["# The step's levers on CPU: hvdbert and the Trainer with the same lever", "",
             f"`python -m bench.step_levers {' '.join(args.argv)}`", "",
             f"{args.rounds} round(s), {args.steps} timed steps after {args.warmup_steps} (hvdbert.bench, one process "
             f"each, CPU-seconds per optimizer step); median over rounds, range in brackets; {seconds / 60:.1f} min.", "",
             "| lever | hvdbert CPU-s/step | Trainer CPU-s/step | hvdbert speed-up | Trainer speed-up | "
             "hvdbert / Trainer |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['lever']} | {cell(row['cpu_seconds_per_step']['hvdbert'], 3)} | "
                     f"{cell(row['cpu_seconds_per_step']['hf'], 3)} | {cell(row['speedup']['hvdbert'], 2, 'x')} | "
                     f"{cell(row['speedup']['hf'], 2, 'x')} | {cell(row['ratio']['hvdbert/hf'], 2)} |")
    return "\n".join(lines) + "\n"


@cli_entry("bench.step_levers")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.step_levers", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, required=True)
    parser.add_argument("--lever", action="append", default=None,
                        help="NAME=SECTION.KEY=VALUE[,...]; the first, with no settings, is the baseline")
    parser.add_argument("--set", action="append", default=["optim.name=adamw"],
                        help="a recipe key for every set, after optim.name=adamw (the Trainer's optimizer), "
                             "which a --set optim.name=... overrides")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.warmup_steps < 0:
        raise UsageError("--rounds and --steps must be at least 1 and --warmup-steps at least 0")
    args.argv = sys.argv[1:] if argv is None else argv
    levers = parse_levers(args.lever or DEFAULT_LEVERS)
    args.output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rounds = []
    for number in range(args.rounds):
        order = levers if number % 2 == 0 else levers[::-1]
        measured = {}
        for name, sets in order:
            print(f"step_levers: round {number + 1}, {name} ...", file=sys.stderr, flush=True)
            measured[name] = measure(args, sets, args.output / "runs" / f"round-{number + 1}-{len(measured)}")
            print(f"step_levers: round {number + 1}, {name}: " + ", ".join(
                f"{SYSTEMS[s]} {v:.3f} CPU-s/step" for s, v in measured[name].items()), file=sys.stderr, flush=True)
        rounds.append(measured)
    rows = summarise(levers, rounds)
    (args.output / "levers.json").write_text(json.dumps({"rounds": rounds, "rows": rows}, indent=2) + "\n")
    text = report(args, rows, time.perf_counter() - started)
    (args.output / "levers.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
