"""Gradient compression's quality at equal steps, and its time to quality on a shaped link.

    python -m bench.compression_quality --data DATA --output docs/bench/compression-quality \
        [--compression none,fp16,powersgd[+SECTION.KEY=VALUE...]] [--seeds 1,2,3] [--steps 600] [--workers 2] \
        [--shaped docs/bench/compression-shaped-bf16/bench.json --link 25mbit] [--target-from QUALITY_JSON]
        [--set SECTION.KEY=VALUE ...]

Every (compression, seed) is one `hvdbert.pretrain` run (under `horovodrun --gloo -np W` for W > 1
workers, so the gradients really cross the wire compressed) of --recipe (BERT-mini by default) with
AdamW at --lr and a global batch of --global-batch-size, as bench/time_to_quality.py's BERT-mini
table trains it, evaluating the held-out split (DATA/validation) every --eval-every steps and after
the last. A compression may carry keys of its own (`powersgd+dist.powersgd_rank=16`: a variant, named by
the whole item). The first compression is the reference (`none`). The table gives each compression's final
held-out loss per seed, their mean and spread (largest minus smallest), the mean's difference from
the reference's and the same-seed differences, and the step at which the seed-mean curve first
reaches the reference's mean final loss (interpolated between evaluations), and where each seed's
run does.

With --shaped (the bench.json of a `python -m hvdbert.bench --hosts ...` run with the same recipe
settings) the time to that loss on a shaped link follows: those steps times that compression's
hvdbert step seconds at --link. It is derived, and the report says so: the quality runs train on
this host, the step times come from the shaped hosts.

With --target-from (another run's quality.json) the target is that run's reference loss instead, and
its reference's steps to it are the baseline of the speed-up: for example a longer PowerSGD schedule
against the uncompressed 600-step runs' final loss, which PowerSGD does not reach in 600 steps.

Finished runs are kept in --workdir (a run with the same settings is not run again); an unfinished
one is started again from nothing. Writes quality.json and quality.md to --output.
"""
from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.time_to_quality import cpu_to_reach
from hvdbert.bench.orchestrate import on_local_workers
from hvdbert.config import read_recipe_tree
from hvdbert.errors import ArgumentParser, UsageError, cli_entry

REPO = Path(__file__).resolve().parents[1]
COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")


def names(text: str, flag: str) -> list[str]:
    items = [item for item in text.split(",") if item]
    if not items or len(set(items)) != len(items):
        raise UsageError(f"{flag} {text!r}: expected distinct comma-separated values")
    return items


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(item) for item in names(text, "--seeds")]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected comma-separated whole numbers, e.g. 1,2,3") from None
    if any(seed < 0 for seed in seeds):
        raise UsageError(f"--seeds {text!r}: seeds are 0 or more")
    return seeds


def parse_compressions(text: str) -> list[str]:
    """The --compression items: NAME or NAME+SECTION.KEY=VALUE[+...], a variant with its own keys
    (e.g. powersgd+dist.powersgd_rank=16), checked here and named by the whole item."""
    chosen = names(text, "--compression")
    for item in chosen:
        name, *keys = item.split("+")
        if name not in COMPRESSIONS:
            raise UsageError(f"--compression {name!r} is not valid; choose from {', '.join(COMPRESSIONS)}")
        if any("=" not in key or key.startswith("=") for key in keys):
            raise UsageError(f"--compression {item!r}: expected NAME+SECTION.KEY=VALUE, "
                             "e.g. powersgd+dist.powersgd_rank=16")
    return chosen


def run_sets(args, compression: str, seed: int) -> list[str]:
    """A run's recipe keys: the benchmark's, the compression's name, --set, then the variant's own keys."""
    name, *keys = compression.split("+")
    return [f"batch.global_batch_size={args.global_batch_size}", f"train.max_steps={args.steps}",
            f"optim.reference_global_batch_size={args.global_batch_size}", "optim.name=adamw", f"optim.lr={args.lr}",
            f"eval.every_steps={args.eval_every}", "eval.at_end=true", f"train.log_every={args.eval_every}",
            "train.progress_bar=false", f"train.seed={seed}", f"dist.compression={name}", *args.set, *keys]


def curve_of(run_dir: Path) -> list[dict]:
    """The run's held-out evaluations, in step order."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in rows if "eval_loss" in r]


def run_settings(args, compression: str, seed: int) -> dict:
    """What a finished run must match to be read back: the recipe's keys with all it inherits (not
    its path, so a moved checkout or a copied recipe still matches), the data, the worker count and
    the run's own keys."""
    return {"recipe": read_recipe_tree(args.recipe), "data": str(args.data), "workers": args.workers,
            "sets": run_sets(args, compression, seed)}


def train(args, compression: str, seed: int) -> tuple[list[dict], float]:
    """The run's curve and its training seconds, training it first unless the workdir holds it
    finished with these settings."""
    run_dir = args.workdir / f"{compression}-seed-{seed}"
    settings = run_settings(args, compression, seed)
    done = run_dir / "quality-run.json"
    if done.is_file():
        record = json.loads(done.read_text())
        if {k: record.get(k) for k in settings} == settings:
            return curve_of(run_dir), record["seconds"]
    shutil.rmtree(run_dir, ignore_errors=True)
    command = on_local_workers([sys.executable, "-m", "hvdbert.pretrain", "--recipe", str(args.recipe), "--data",
                                str(args.data), "--output", str(run_dir),
                                *(a for s in settings["sets"] for a in ("--set", s))], args.workers)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    curve = curve_of(run_dir)
    if not curve or curve[-1]["step"] != args.steps:
        raise RuntimeError(f"{run_dir}: no held-out loss after step {args.steps} in metrics.jsonl")
    seconds = time.perf_counter() - started
    done.write_text(json.dumps({**settings, "seconds": seconds}) + "\n")
    return curve, seconds


def mean_curve(curves: list[list[dict]]) -> list[dict]:
    """The seeds' mean held-out loss at each evaluated step (every run evaluates at the same steps)."""
    return [{"step": rows[0]["step"], "eval_loss": statistics.fmean(r["eval_loss"] for r in rows)}
            for rows in zip(*curves, strict=True)]


def step_seconds_at(shaped: dict, link: str) -> dict[str, float]:
    """hvdbert's step seconds per compression at `link` in a shaped bench.json."""
    rows = [r for r in shaped["rows"] if r["system"] == "hvdbert" and r.get("link") == link]
    if not rows:
        links = sorted({r.get("link") for r in shaped["rows"] if r.get("link")})
        raise UsageError(f"--link {link!r}: the --shaped run has no hvdbert row there; it has {', '.join(links)}")
    return {r.get("compression") or "none": r["step_seconds"] for r in rows}


def summarise(curves: dict[str, list[list[dict]]], step_seconds: dict[str, float] | None = None,
              target_from: dict | None = None) -> dict:
    """Per compression: final losses per seed, mean, spread, differences from the first compression
    (the reference), the step where the seed-mean curve reaches the reference's mean final loss, and
    with `step_seconds` (per compression, from a shaped run) the time to get there. `target_from` (an
    earlier summary) sets the target to its reference's loss, and the speed-ups are against its
    reference's steps to that loss at its compression's step seconds."""
    reference = next(iter(curves))
    finals = {c: [runs[-1]["eval_loss"] for runs in per_seed] for c, per_seed in curves.items()}
    target = statistics.fmean(finals[reference]) if target_from is None else target_from["target_eval_loss"]
    means = {c: mean_curve(per_seed) for c, per_seed in curves.items()}
    rows = []
    for compression, per_seed in curves.items():
        reach = cpu_to_reach(means[compression], target, x="step")
        row = {"compression": compression, "final_eval_loss": finals[compression],
               "mean": statistics.fmean(finals[compression]),
               "spread": max(finals[compression]) - min(finals[compression]),
               "same_seed_difference": [a - b for a, b in zip(finals[compression], finals[reference], strict=True)],
               "steps_to_target": reach["interpolated"],
               "steps_to_target_per_seed": [cpu_to_reach(run, target, x="step")["interpolated"] for run in per_seed]}
        row["mean_difference"] = row["mean"] - target
        if step_seconds is not None and compression in step_seconds:
            row["step_seconds"] = step_seconds[compression]
            row["seconds_to_target"] = (None if reach["interpolated"] is None
                                        else reach["interpolated"] * step_seconds[compression])
        rows.append(row)
    # The highest mean final loss: every seed-mean curve gets there, so each has a time to it even
    # when a compression ends above the reference's loss.
    common = max(row["mean"] for row in rows)
    for row in rows:
        row["steps_to_common"] = cpu_to_reach(means[row["compression"]], common, x="step")["interpolated"]
        if "step_seconds" in row:
            row["seconds_to_common"] = row["steps_to_common"] * row["step_seconds"]
    baselines = {key: rows[0].get(f"seconds_to_{key}") for key in ("target", "common")}
    if target_from is not None:  # the other run's reference, its steps to its own loss
        name, steps = target_from["reference"], target_from["rows"][0]["steps_to_target"]
        baselines = {"target": None if step_seconds is None or name not in step_seconds or steps is None
                     else steps * step_seconds[name]}
    for key, base in baselines.items():
        for row in rows:
            if base is not None and row.get(f"seconds_to_{key}") is not None:
                row[f"speedup_to_{key}"] = base / row[f"seconds_to_{key}"]
    summary = {"reference": reference, "target_eval_loss": target, "common_eval_loss": common, "rows": rows}
    if target_from is not None:
        summary["target_from"] = {"reference": name, "target_eval_loss": target, "steps_to_target": steps,
                                  "seconds_to_target": baselines["target"]}
    return summary


def read_target(path: Path) -> dict:
    """Another run's summary, for --target-from: what it says its reference reached, and when."""
    try:
        other = json.loads(path.read_text(encoding="utf-8"))
        other["target_eval_loss"], other["rows"][0]["steps_to_target"], other["reference"]
    except FileNotFoundError:
        raise UsageError(f"--target-from {path}: no such file (a bench.compression_quality run's quality.json)") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise UsageError(f"--target-from {path}: not a bench.compression_quality quality.json "
                         "(no target_eval_loss, reference or rows)") from None
    return other


def _f(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def target_sentence(args, summary: dict) -> str:
    other = summary.get("target_from")
    if other is None:
        return f"Target: the {summary['reference']} runs' mean final held-out loss, {summary['target_eval_loss']:.4f}."
    seconds = other["seconds_to_target"]
    return (f"Target: the {other['reference']} runs' mean final held-out loss in {args.target_from}, "
            f"{summary['target_eval_loss']:.4f}, which their seed-mean curve reached at step {_f(other['steps_to_target'], '.0f')}"
            + ("" if seconds is None else f" ({seconds / 60:.1f} min at {args.link}: the speed-ups' baseline)") + ".")


def report(args, seeds: list[int], summary: dict, minutes: float) -> str:
    timed = args.shaped is not None
    named = [s.partition("=")[2] for s in args.set if s.startswith("optim.name=")]
    optimizer = named[-1] if named else "AdamW"
    lines = ["# Gradient compression: held-out loss at equal steps", "",
             f"`python -m bench.compression_quality {' '.join(args.argv)}`", "",
             f"{args.steps} steps of {args.global_batch_size} sequences, {optimizer} at {args.lr}, {args.workers} worker(s), "
             f"seeds {', '.join(map(str, seeds))}; held-out loss every {args.eval_every} steps; {minutes:.1f} min of "
             "training (the runs' own wall time, read back for finished runs). " + target_sentence(args, summary), "",
             "| compression | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | spread | mean − target "
             f"| same-seed − {summary['reference']} | steps to {summary['target_eval_loss']:.4f}: "
             "seed mean (per seed) |"
             + (f" step s at {args.link} | time to {summary['target_eval_loss']:.4f} | speed-up |" if timed else ""),
             "|---|" + "---:|" * (len(seeds) + 5) + ("---:|" * 3 if timed else "")]
    for row in summary["rows"]:
        line = (f"| {row['compression']} | " + " | ".join(f"{v:.4f}" for v in row["final_eval_loss"])
                + f" | {row['mean']:.4f} | {row['spread']:.4f} | {row['mean_difference']:+.4f} | "
                + ", ".join(f"{d:+.4f}" for d in row["same_seed_difference"])
                + f" | {_f(row['steps_to_target'], '.0f')} ("
                + ", ".join(_f(steps, ".0f") for steps in row["steps_to_target_per_seed"]) + ") |")
        if timed:
            seconds = row.get("seconds_to_target")
            line += (f" {_f(row.get('step_seconds'), '.2f')} | {_f(None if seconds is None else seconds / 60, '.1f')}"
                     f"{'' if seconds is None else ' min'} | {_f(row.get('speedup_to_target'), '.2f')}"
                     f"{'' if row.get('speedup_to_target') is None else 'x'} |")
        lines.append(line)
    if timed and "target_from" not in summary:
        lines += ["", f"To the common loss {summary['common_eval_loss']:.4f} (the highest mean final loss, which every "
                      "seed-mean curve reaches): " + "; ".join(
                          f"{row['compression']} {row['steps_to_common']:.0f} steps"
                          + (f", {row['seconds_to_common'] / 60:.1f} min ({row['speedup_to_common']:.2f}x)"
                             if "speedup_to_common" in row else "") for row in summary["rows"]) + "."]
        lines += ["", f"Time to quality at {args.link} is derived: steps to the target (the seed-mean curve, "
                      f"interpolated between evaluations) times hvdbert's step seconds for that compression in "
                      f"{args.shaped}. The quality runs trained on one host."]
    return "\n".join(lines) + "\n"


@cli_entry("bench.compression_quality")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.compression_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared data with a held-out split (validation/)")
    parser.add_argument("--output", type=Path, required=True, help="directory for quality.json and quality.md")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "compression-quality")
    parser.add_argument("--recipe", type=Path, default=REPO / "bench" / "recipes" / "bert-mini-cpu.toml")
    parser.add_argument("--compression", default="none,fp16,powersgd",
                        help="comma-separated NAME[+SECTION.KEY=VALUE...]; the first is the reference")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--shaped", type=Path, help="a shaped hvdbert.bench run's bench.json: its step times")
    parser.add_argument("--link", help="the --shaped run's link rate to take step times from, e.g. 25mbit")
    parser.add_argument("--target-from", type=Path, metavar="QUALITY_JSON",
                        help="another run's quality.json: its reference's mean final loss is the target")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a recipe key for every run, after the benchmark's own (repeatable)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    compressions, seeds = parse_compressions(args.compression), parse_seeds(args.seeds)
    if min(args.steps, args.global_batch_size, args.workers, args.eval_every) < 1 or not args.lr > 0:
        raise UsageError("--steps, --global-batch-size, --workers and --eval-every must be at least 1, --lr above 0")
    if args.steps % args.eval_every:
        raise UsageError(f"--eval-every {args.eval_every} must divide --steps {args.steps}")
    if not (args.data / "validation").is_dir():
        raise UsageError(f"--data {args.data}: no held-out split (DATA/validation); prepare it with a validation split")
    if (args.shaped is None) != (args.link is None):
        raise UsageError("--shaped and --link go together: the shaped run's bench.json and the link rate to read")
    step_seconds = None
    if args.shaped is not None:
        if not args.shaped.is_file():
            raise UsageError(f"--shaped {args.shaped}: no such file (a hvdbert.bench --hosts run's bench.json)")
        step_seconds = step_seconds_at(json.loads(args.shaped.read_text()), args.link)
    target_from = None if args.target_from is None else read_target(args.target_from)
    args.data, args.workdir, args.recipe = args.data.resolve(), args.workdir.resolve(), args.recipe.resolve()
    args.output.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[list[dict]]] = {c: [] for c in compressions}
    seconds = 0.0
    for seed in seeds:  # seed by seed: a drifting load meets every compression alike
        for compression in compressions:
            print(f"compression_quality: {compression}, seed {seed} ...", file=sys.stderr, flush=True)
            curve, run_seconds = train(args, compression, seed)
            curves[compression].append(curve)
            seconds += run_seconds
            print(f"compression_quality: {compression}, seed {seed}: held-out loss "
                  f"{curves[compression][-1][-1]['eval_loss']:.4f}", file=sys.stderr, flush=True)
    summary = summarise(curves, step_seconds, target_from)
    (args.output / "quality.json").write_text(json.dumps({"command": args.argv, "curves": curves, **summary},
                                                         indent=2) + "\n")
    text = report(args, seeds, summary, seconds / 60)
    (args.output / "quality.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
