"""Learning-rate sweep: train a recipe once per optimizer, rate and seed, and tabulate where each got.

    python -m bench.lr_sweep --recipe recipes/tiny.toml --lamb 1e-2,3e-3,1e-3,3e-4 \
        --adamw 3e-3,1e-3,5e-4,2e-4 --seeds 1,2,3 --output docs/bench/tiny-lr-sweep [--jobs 2] [--set KEY=VALUE ...]

Each run is `python -m hvdbert.pretrain` as one plain process, on the embedded corpus unless --data is
given. Under `batch.scaling = "fixed-global"` one process sees the same batches, masks and losses as any
worker count (README: reproducible data order), so this measures what `make demo` gets on 2 workers.
A rate is the recipe's optim.lr (the rate at optim.reference_global_batch_size); `recipe` keeps the
recipe's own. The table shows the rate the plan derived from it as well.

Every run ends with a held-out evaluation (`eval.at_end`: the data's validation/ split, the same
sequences and masks for every run), and the table ranks rates by it: the training loss is measured
on the batches being fitted, the held-out loss on documents no run trained on.

Runs go --jobs at a time (default 1; each takes the cores its recipe gives it, one by default).
OUTPUT/sweep.jsonl gets one line per run as it finishes, with its logged curve; a sweep started again
skips the runs already there.
OUTPUT/sweep.md is the table of every run in sweep.jsonl (this sweep's and earlier ones' into the same
OUTPUT), then the mean over seeds per optimizer and rate.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.lr_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe TOML file")
    parser.add_argument("--data", help="prepared data directory (default: the embedded corpus)")
    parser.add_argument("--output", required=True, type=Path, help="directory for sweep.jsonl and sweep.md")
    parser.add_argument("--lamb", default="", help="comma-separated LAMB rates, or `recipe`")
    parser.add_argument("--adamw", default="", help="comma-separated AdamW rates, or `recipe`")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated train.seed values")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="recipe override for every run (repeatable)")
    return parser.parse_args(argv)


def runs(args: argparse.Namespace) -> list[dict]:
    seeds = [int(s) for s in args.seeds.split(",")]
    rates = {"lamb": args.lamb, "adamw": args.adamw}
    # Seed outermost: a sweep cut short still has every optimizer and rate.
    return [{"optimizer": name, "lr": rate, "seed": seed}
            for seed in seeds
            for name, listed in rates.items() if listed
            for rate in listed.split(",")]


def run_key(run: dict) -> tuple:
    return run["optimizer"], run["lr"], run["seed"]


def train_once(args: argparse.Namespace, run: dict, workdir: Path) -> dict:
    run_dir = workdir / f"{run['optimizer']}-{run['lr']}-{run['seed']}"
    sets = [*args.set, f"optim.name={run['optimizer']}", f"train.seed={run['seed']}",
            "train.progress_bar=false", "checkpoint.every_steps=1000000", "eval.at_end=true"]
    if run["lr"] != "recipe":
        sets.append(f"optim.lr={run['lr']}")
    command = [sys.executable, "-m", "hvdbert.pretrain", "--recipe", args.recipe, "--output", str(run_dir)]
    command += ["--data", args.data] if args.data else []
    for value in sets:
        command += ["--set", value]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HOROVOD_RANK", None)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    plan = json.loads((run_dir / "recipe.json").read_text())["plan"]
    last = records[-1]
    return {
        **run,
        "plan_lr": plan["lr"],
        "global_batch_size": plan["global_batch_size"],
        "steps": last["step"],
        "final_loss": last["loss"],  # the mean over the last log_every steps
        "final_mlm_accuracy": last["mlm_accuracy"],
        "eval_loss": last["eval_loss"],
        "eval_mlm_accuracy": last["eval_mlm_accuracy"],
        # absent when the data was prepared before hvdbert stored its training token counts
        "eval_unigram_cross_entropy": last.get("eval_unigram_cross_entropy"),
        "seconds": round(seconds, 1),
        "curve": [[r["step"], round(r["loss"], 4), round(r["mlm_accuracy"], 4)] for r in records],
        "command": " ".join(command[1:]),
    }


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def table(results: list[dict]) -> str:
    """Every run, then per optimizer and rate the mean (min-max) over seeds, best held-out loss first."""
    lines = ["| optimizer | lr | lr used | seed | steps | final loss | MLM accuracy | held-out loss | held-out MLM accuracy |",
             "|---|---|---|---|---|---|---|---|---|"]
    ordered = sorted(results, key=lambda r: (r["optimizer"], -r["plan_lr"], r["seed"]))
    for r in ordered:
        lines.append(f"| {r['optimizer']} | {r['lr']} | {r['plan_lr']:.3g} | {r['seed']} | {r['steps']} | "
                     f"{r['final_loss']:.3f} | {r['final_mlm_accuracy']:.3f} | {r['eval_loss']:.3f} | "
                     f"{r['eval_mlm_accuracy']:.3f} |")
    groups: dict[tuple, list[dict]] = {}
    for r in ordered:
        groups.setdefault((r["optimizer"], r["lr"]), []).append(r)
    lines += ["", "| optimizer | lr | seeds | final loss | MLM accuracy | held-out loss | held-out MLM accuracy |",
              "|---|---|---|---|---|---|---|"]
    for (optimizer, lr), group in sorted(groups.items(), key=lambda g: statistics.mean(r["eval_loss"] for r in g[1])):
        lines.append(f"| {optimizer} | {lr} | {len(group)} | {spread([r['final_loss'] for r in group])} | "
                     f"{spread([r['final_mlm_accuracy'] for r in group])} | {spread([r['eval_loss'] for r in group])} | "
                     f"{spread([r['eval_mlm_accuracy'] for r in group])} |")
    baseline = results[0].get("eval_unigram_cross_entropy") if results else None
    if baseline is not None:
        lines += ["", f"Held-out loss of a predictor of the training data's token frequencies: {baseline:.4f} "
                      "(a model that ignores the context)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    results_path = args.output / "sweep.jsonl"
    done = [json.loads(line) for line in results_path.read_text().splitlines()] if results_path.is_file() else []
    finished = {run_key(r) for r in done}
    todo = [run for run in runs(args) if run_key(run) not in finished]
    with tempfile.TemporaryDirectory(prefix="lr-sweep-") as workdir, \
            concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in concurrent.futures.as_completed([pool.submit(train_once, args, run, Path(workdir)) for run in todo]):
            result = future.result()
            print(f"{result['optimizer']} lr {result['lr']} seed {result['seed']}: final loss "
                  f"{result['final_loss']:.4f}, MLM accuracy {result['final_mlm_accuracy']:.4f}, held-out loss "
                  f"{result['eval_loss']:.4f}, accuracy {result['eval_mlm_accuracy']:.4f} ({result['seconds']} s)",
                  flush=True)
            with results_path.open("a", encoding="utf-8") as out:
                out.write(json.dumps(result) + "\n")
            done.append(result)
    (args.output / "sweep.md").write_text(table(done), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
