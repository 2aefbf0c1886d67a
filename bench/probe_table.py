"""What pretraining gave: hvdbert.finetune on pretrained models and on the same shapes from scratch,
several seeds, at finetune's defaults and few-shot, in one table.

    python -m bench.probe_table --model demo=RUN_DIR [--model NAME=RUN_DIR|HF_DIR ...] --output DIR
        [--seeds 3] [--few-shot-per-class 16] [--few-shot-epochs 20] [--task builtin] [--workdir DIR]
        [--settings defaults,few-shot] [--jobs 1] [--threads 1]

For each model, each setting (`defaults`: finetune's own; `few-shot`: --train-per-class N and
--epochs E, the rates finetune's defaults) and seeds 1..--seeds, `python -m hvdbert.finetune --task
builtin` runs on the model and with --from-scratch (the same configuration, random weights), --jobs
processes at a time, each with --threads threads (OMP_NUM_THREADS: on a loaded machine more threads
than free cores spin in OpenMP's barriers and gain nothing). Each result is kept as WORKDIR/NAME/SETTING-INIT-seedK.json (WORKDIR defaults to
OUTPUT/runs): a table started again runs only what is missing.

OUTPUT/probe.md is the table: dev accuracy per model and setting, pretrained and from scratch, each
as mean (min-max) and per seed, the gap between the means, and whether it is larger than the
seed-to-seed spread (the larger of the two ranges, max - min). OUTPUT/probe.json holds every result.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INITS = ("pretrained", "scratch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.probe_table", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a name for the table and an hvdbert run or transformers model directory (repeatable)")
    parser.add_argument("--output", required=True, type=Path, help="directory for probe.md and probe.json")
    parser.add_argument("--workdir", type=Path, help="where each fine-tuning's result is kept (default OUTPUT/runs)")
    parser.add_argument("--task", default="builtin", help="hvdbert.finetune --task")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N for each model and setting")
    parser.add_argument("--few-shot-per-class", type=int, default=16, help="the few-shot setting's --train-per-class")
    parser.add_argument("--few-shot-epochs", type=float, default=20.0, help="the few-shot setting's --epochs")
    parser.add_argument("--settings", default="defaults,few-shot", help="which settings, comma-separated")
    parser.add_argument("--jobs", type=int, default=1, help="fine-tunings at a time")
    parser.add_argument("--threads", type=int, default=1, help="threads per fine-tuning (OMP_NUM_THREADS)")
    args = parser.parse_args(argv)
    models = {}
    for given in args.model:
        name, _, path = given.partition("=")
        if not name or not path or not Path(path).is_dir():
            parser.error(f"--model {given}: give NAME=DIR with DIR an hvdbert run or a transformers model directory")
        models[name] = Path(path)
    args.models = models
    args.workdir = args.workdir or args.output / "runs"
    args.settings = args.settings.split(",")
    unknown = set(args.settings) - {"defaults", "few-shot"}
    if unknown:
        parser.error(f"--settings {','.join(sorted(unknown))}: choose from defaults, few-shot")
    return args


def settings(args) -> dict[str, list[str]]:
    every = {"defaults": [],
             "few-shot": ["--train-per-class", str(args.few_shot_per_class), "--epochs", format(args.few_shot_epochs, "g")]}
    return {name: flags for name, flags in every.items() if name in args.settings}


def finetune_once(args, model: Path, flags: list[str], seed: int, init: str, result: Path) -> dict:
    """One fine-tuning's scores: read back when `result` holds this model's, else run it."""
    kept = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else None
    if kept is not None and kept.get("model") == str(model):
        return kept
    result.unlink(missing_ok=True)  # an earlier table's, of another model under the same name
    result.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="probe-", dir=result.parent) as scratch:
        command = [sys.executable, "-m", "hvdbert.finetune", "--model", str(model), "--task", args.task,
                   "--output", str(Path(scratch) / "model"), "--json", str(result), "--seed", str(seed),
                   *flags, *(["--from-scratch"] if init == "scratch" else [])]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr[-3000:]}")
    print(completed.stdout.strip().splitlines()[-1], flush=True)
    return json.loads(result.read_text(encoding="utf-8"))


def summary(rows: list[dict]) -> list[dict]:
    """Per model and setting: each init's accuracies by seed, mean and range; the gap and the verdict."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for setting in dict.fromkeys(r["setting"] for r in rows if r["model"] == model):
            line = {"model": model, "setting": setting}
            for init in INITS:
                scores = [r["dev_accuracy"] for r in sorted(rows, key=lambda r: r["seed"])
                          if (r["model"], r["setting"], r["init"]) == (model, setting, init)]
                line[init] = {"per_seed": scores, "mean": statistics.fmean(scores), "min": min(scores),
                              "max": max(scores)}
            line["gap"] = line["pretrained"]["mean"] - line["scratch"]["mean"]
            line["spread"] = max(line[i]["max"] - line[i]["min"] for i in INITS)
            line["beats_spread"] = line["gap"] > line["spread"]
            out.append(line)
    return out


def table(lines: list[dict], rows: list[dict], command: str) -> str:
    first = rows[0]
    text = ["# What pretraining gave: hvdbert.finetune, pretrained against from scratch", "",
            "```bash", command, "```", "",
            f"Dev accuracy on {first['dev_examples']} dev examples (majority class {first['dev_majority_accuracy']:.4f}). "
            f"Head lr {first['lr']:g}, encoder lr {first['encoder_lr']:g}, {first['pooling']} pooling. "
            "Spread: the larger of the two seed ranges (max - min).", "",
            "| model | setting | pretrained: mean (min-max) | from scratch: mean (min-max) | gap | spread | gap > spread "
            "| pretrained per seed | from scratch per seed |",
            "|---|---|---|---|---:|---:|---|---|---|"]
    for line in lines:
        cells = [f"{line[i]['mean']:.4f} ({line[i]['min']:.4f}-{line[i]['max']:.4f})" for i in INITS]
        seeds = [", ".join(f"{s:.4f}" for s in line[i]["per_seed"]) for i in INITS]
        text.append(f"| {line['model']} | {line['setting']} | {cells[0]} | {cells[1]} | {line['gap']:+.4f} | "
                    f"{line['spread']:.4f} | {'yes' if line['beats_spread'] else 'no'} | {seeds[0]} | {seeds[1]} |")
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = [(name, model, setting, flags, seed, init)
            for name, model in args.models.items() for setting, flags in settings(args).items()
            for seed in range(1, args.seeds + 1) for init in INITS]

    def run(job) -> dict:
        name, model, setting, flags, seed, init = job
        scores = finetune_once(args, model, flags, seed, init, args.workdir / name / f"{setting}-{init}-seed{seed}.json")
        # the table's name, not finetune's own "model" (the directory it was given)
        return {**scores, "model": name, "model_dir": scores["model"], "setting": setting, "init": init, "seed": seed}

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(run, jobs))  # in the jobs' order, whichever finishes first
    lines = summary(rows)
    args.output.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.probe_table " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.output / "probe.md").write_text(table(lines, rows, command), encoding="utf-8")
    (args.output / "probe.json").write_text(json.dumps({"summary": lines, "runs": rows}, indent=2) + "\n",
                                            encoding="utf-8")
    print(table(lines, rows, command), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
