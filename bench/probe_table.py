"""What pretraining gave: hvdbert.finetune on pretrained models and on the same shapes from scratch,
several seeds, at finetune's defaults and few-shot, in one table.

    python -m bench.probe_table --model demo=RUN_DIR [--model NAME=RUN_DIR|HF_DIR ...] --output DIR
        [--seeds 3] [--few-shot-per-class 16] [--few-shot-epochs 20] [--task builtin] [--workdir DIR]
        [--settings defaults,few-shot] [--encoder-lrs 1e-4,3e-4,1e-3] [--jobs 1] [--threads 1]

For each model, each setting (`defaults`: finetune's own; `few-shot`: --train-per-class N and
--epochs E, the rates finetune's defaults) and seeds 1..--seeds, `python -m hvdbert.finetune --task
builtin` runs on the model and with --from-scratch (the same configuration, random weights), --jobs
processes at a time, each with --threads threads (OMP_NUM_THREADS: on a loaded machine more threads
than free cores spin in OpenMP's barriers and gain nothing). Each result is kept as
WORKDIR/NAME/SETTING-INIT-seedK.json (WORKDIR defaults to OUTPUT/runs): a table started again runs
only what is missing.

--encoder-lrs sweeps the encoder's rate (finetune --encoder-lr; without it, finetune's default): every
seed runs at every rate, each result kept as SETTING-INIT-elrR-seedK.json, and each init (pretrained,
from scratch) is reported at the rate where its mean over the seeds is best. A young encoder and a
random one want different rates: one rate for both would measure the rate, not what pretraining gave.
The rate is chosen on the dev set it is reported on, for both inits alike.

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

from hvdbert.errors import ArgumentParser, cli_entry

REPO = Path(__file__).resolve().parents[1]
INITS = ("pretrained", "scratch")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m bench.probe_table", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="a name for the table and an hvdbert run or transformers model directory (repeatable)")
    parser.add_argument("--output", required=True, type=Path, help="directory for probe.md and probe.json")
    parser.add_argument("--workdir", type=Path, help="where each fine-tuning's result is kept (default OUTPUT/runs)")
    parser.add_argument("--task", default="builtin", help="hvdbert.finetune --task")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N for each model and setting")
    parser.add_argument("--few-shot-per-class", type=int, default=16, help="the few-shot setting's --train-per-class")
    parser.add_argument("--few-shot-epochs", type=float, default=20.0, help="the few-shot setting's --epochs")
    parser.add_argument("--settings", default="defaults,few-shot", help="which settings, comma-separated")
    parser.add_argument("--encoder-lrs", help="encoder rates to sweep, comma-separated; each init reported at its best "
                        "(default: finetune's --encoder-lr alone)")
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
    args.rates = [None]  # finetune's own default
    if args.encoder_lrs is not None:
        try:
            args.rates = [float(rate) for rate in args.encoder_lrs.split(",")]
        except ValueError:
            args.rates = []
        if not args.rates or min(args.rates) <= 0 or len(set(args.rates)) != len(args.rates):
            parser.error(f"--encoder-lrs {args.encoder_lrs}: give distinct positive rates, comma-separated, "
                         "for example 1e-4,3e-4,1e-3")
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


def best_rate(rows: list[dict]) -> dict:
    """One init's results (one model and setting), at the encoder rate whose mean over the seeds is best."""
    by_rate: dict[float, list[float]] = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        by_rate.setdefault(r["encoder_lr"], []).append(r["dev_accuracy"])
    rate = max(by_rate, key=lambda rate: statistics.fmean(by_rate[rate]))
    scores = by_rate[rate]
    return {"per_seed": scores, "mean": statistics.fmean(scores), "min": min(scores), "max": max(scores),
            "encoder_lr": rate, "mean_by_rate": {format(r, "g"): statistics.fmean(s) for r, s in sorted(by_rate.items())}}


def summary(rows: list[dict]) -> list[dict]:
    """Per model and setting: each init's accuracies by seed (at its best encoder rate), mean and range;
    the gap and the verdict."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for setting in dict.fromkeys(r["setting"] for r in rows if r["model"] == model):
            line = {"model": model, "setting": setting}
            for init in INITS:
                line[init] = best_rate([r for r in rows if (r["model"], r["setting"], r["init"]) == (model, setting, init)])
            line["gap"] = line["pretrained"]["mean"] - line["scratch"]["mean"]
            line["spread"] = max(line[i]["max"] - line[i]["min"] for i in INITS)
            line["beats_spread"] = line["gap"] > line["spread"]
            out.append(line)
    return out


def table(lines: list[dict], rows: list[dict], command: str) -> str:
    first = rows[0]
    rates = sorted({r["encoder_lr"] for r in rows})
    if len(rates) == 1:
        rate_text = f"encoder lr {rates[0]:g}"
    else:
        rate_text = (f"encoder lr swept over {', '.join(format(r, 'g') for r in rates)}: each init at the rate "
                     "where its mean is best (the rate column; chosen on this dev set, for both inits alike)")
    text = ["# What pretraining gave: hvdbert.finetune, pretrained against from scratch", "",
            "```bash", command, "```", "",
            f"Dev accuracy on {first['dev_examples']} dev examples (majority class {first['dev_majority_accuracy']:.4f}). "
            f"Head lr {first['lr']:g}, {rate_text}, {first['pooling']} pooling. "
            "Spread: the larger of the two seed ranges (max - min).", "",
            "| model | setting | pretrained: mean (min-max) | from scratch: mean (min-max) | gap | spread | gap > spread "
            "| encoder lr: pretrained, scratch | pretrained per seed | from scratch per seed |",
            "|---|---|---|---|---:|---:|---|---|---|---|"]
    for line in lines:
        cells = [f"{line[i]['mean']:.4f} ({line[i]['min']:.4f}-{line[i]['max']:.4f})" for i in INITS]
        seeds = [", ".join(f"{s:.4f}" for s in line[i]["per_seed"]) for i in INITS]
        chosen = ", ".join(format(line[i]["encoder_lr"], "g") for i in INITS)
        text.append(f"| {line['model']} | {line['setting']} | {cells[0]} | {cells[1]} | {line['gap']:+.4f} | "
                    f"{line['spread']:.4f} | {'yes' if line['beats_spread'] else 'no'} | {chosen} | {seeds[0]} | {seeds[1]} |")
    return "\n".join(text) + "\n"


@cli_entry("bench.probe_table")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = [(name, model, setting, flags, rate, seed, init)
            for name, model in args.models.items() for setting, flags in settings(args).items()
            for rate in args.rates for seed in range(1, args.seeds + 1) for init in INITS]

    def run(job) -> dict:
        name, model, setting, flags, rate, seed, init = job
        swept = [] if rate is None else ["--encoder-lr", format(rate, "g")]
        kept = f"{setting}-{init}-seed{seed}.json" if rate is None else f"{setting}-{init}-elr{rate:g}-seed{seed}.json"
        scores = finetune_once(args, model, [*flags, *swept], seed, init, args.workdir / name / kept)
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
