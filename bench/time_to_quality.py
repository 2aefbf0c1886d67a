"""Time to quality: hvdbert against transformers' Trainer on run_mlm.py's recipe, held-out loss against
samples and CPU-seconds, each system at the best learning rate of a small sweep, then a downstream probe.

    python -m bench.time_to_quality --data DATA_DIR --output DIR [--workdir DIR]
        [--recipe bench/recipes/bert-mini-cpu.toml] [--hvdbert adamw:5e-4,adamw:1e-3,lamb:3e-3]
        [--trainer 2e-4,5e-4,1e-3] [--steps 600] [--global-batch-size 64] [--save-every 50]
        [--probe-seeds 3] [--probe-epochs E] [--probe-lr LR] [--probe-train-per-class N] [--input PATH ...]
        [--set SECTION.KEY=VALUE ...]

DATA_DIR is `hvdbert.prepare` output with a held-out split (--validation-fraction). Both systems train
the recipe's model shape (BERT-mini by default) from scratch, one process each with the recipe's
dist.threads_per_worker threads, for the same number of samples (--steps x --global-batch-size), and
save the model every --save-every steps:

- hvdbert: the training loop `pretrain` runs (`rundir.train_once` on the `Run` that `build_run`
  assembles, Horovod initialised as a one-process `pretrain` does), with optim.name and optim.lr from the sweep
  and the recipe's own schedule (warmup, polynomial decay, weight decay);
- the Trainer: run_mlm.py's recipe on the same training documents (read again from the data's input
  and checked against it), tokenizer and sequence length: tokenize, `group_texts`,
  DataCollatorForLanguageModeling (data.mask_prob, 15% as in run_mlm.py), BertForMaskedLM from the same config, and the Trainer's
  defaults as run_mlm.py leaves them (AdamW, linear decay, no warmup, no weight decay, grad-norm
  clipping at 1.0), with the same micro-batch and gradient accumulation to the same global batch.

CPU-seconds are the training process's user + system time (`time.process_time()`: all its threads,
data loading, the Horovod thread and logging included), counted from the start of the training loop
(after the model, data and, for the Trainer, the tokenized dataset are built: data preparation is not
timed on either side) and less the CPU time of every save (hvdbert: `Checkpointer.save`; Trainer: from
`on_step_end` of a saving step to `on_save`, which also covers its logging at that step). Nothing is
evaluated while training: afterwards every saved model of both systems goes through the same
`hvdbert.evaluate.evaluate()` on the same held-out sequences with the same fixed masks ([eval]:
15%, eval.seed, eval.max_sequences), in this process, with the same thread count.

Each system's best rate is the one with the lowest final held-out loss. The headline: the Trainer's
best final loss, and the CPU-seconds hvdbert's best run needed to first reach it, interpolated
linearly between the two saves around the crossing (or the first save when that one is already at or
below it), as a ratio of the CPU-seconds of the Trainer's best run. The probe: `hvdbert.finetune
--task builtin` on both best final models and, as the baseline, --from-scratch, over --probe-seeds seeds.

Written to OUTPUT: quality.jsonl (one row per saved model: system, optimizer, lr, step, samples,
cpu_seconds, wall_seconds, eval_loss, eval_mlm_accuracy, ...), quality.md (the tables), quality.png
(held-out loss against samples and against CPU-seconds; each system's best rate thick, the others
thin) and summary.json. The runs, their checkpoints and the probe results stay in --workdir: a
benchmark started again with the same settings skips what is already there. Not a test: at the
default size it takes hours of both cores.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLOCK = "clock.jsonl"  # per run: one row per save: step, samples, cpu_seconds, wall_seconds
DONE = "done.json"  # per run: written last; the run is complete
SYSTEMS = {"hvdbert": "hvdbert", "trainer": "HF Trainer (run_mlm.py)"}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep."""

    system: str  # hvdbert | trainer
    optimizer: str  # hvdbert: optim.name; trainer: adamw (the Trainer's default)
    lr: str  # as given on the command line

    @property
    def name(self) -> str:
        return f"{self.system}-{self.optimizer}-{self.lr}"

    @property
    def label(self) -> str:
        return f"{SYSTEMS[self.system]} {self.optimizer} {self.lr}"


def parse_args(argv: list[str] | None):
    from hvdbert.errors import ArgumentParser, UsageError

    parser = ArgumentParser(prog="python -m bench.time_to_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="prepared data directory with a held-out split (validation/)")
    parser.add_argument("--output", type=Path, help="directory for quality.jsonl, quality.md, quality.png")
    parser.add_argument("--workdir", type=Path, default=Path("runs/time-to-quality"),
                        help="the runs, their checkpoints and the probe results (default: runs/time-to-quality)")
    parser.add_argument("--recipe", default=str(REPO / "bench" / "recipes" / "bert-mini-cpu.toml"),
                        help="hvdbert recipe: model shape, micro-batch, sequence length, threads (default: BERT-mini)")
    parser.add_argument("--hvdbert", default="adamw:5e-4,adamw:1e-3,lamb:3e-3",
                        help="hvdbert's sweep: comma-separated OPTIMIZER:LR (default: adamw:5e-4,adamw:1e-3,lamb:3e-3)")
    parser.add_argument("--trainer", default="2e-4,5e-4,1e-3",
                        help="the Trainer's sweep: comma-separated AdamW rates (default: 2e-4,5e-4,1e-3)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every run (default 600)")
    parser.add_argument("--global-batch-size", type=int, default=64, help="sequences per step (default 64)")
    parser.add_argument("--save-every", type=int, default=50, help="steps between saved models (default 50)")
    parser.add_argument("--probe-seeds", type=int, default=3, help="fine-tuning seeds per model (default 3; 0: no probe)")
    parser.add_argument("--probe-epochs", type=float, help="hvdbert.finetune --epochs (default: finetune's)")
    parser.add_argument("--probe-lr", type=float, help="hvdbert.finetune --lr (default: finetune's)")
    parser.add_argument("--probe-train-per-class", type=int,
                        help="hvdbert.finetune --train-per-class: a few-shot probe (default: every example)")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="the input DATA_DIR was prepared from (default: its manifest's source)")
    parser.add_argument("--text-field", help="as given to prepare (default: prepare's)")
    parser.add_argument("--text-documents", help="as given to prepare (default: prepare's)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="recipe override for both systems, after the flags above (repeatable), e.g. "
                             "dist.threads_per_worker=2")
    parser.add_argument("--child", choices=sorted(SYSTEMS), help=argparse.SUPPRESS)  # internal: one training run
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return args
    if args.data is None or args.output is None:
        raise UsageError("--data DATA_DIR and --output DIR are required")
    for name in ("steps", "global_batch_size", "save_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if args.probe_seeds < 0 or any(value is not None and not value > 0 for value in (
            args.probe_epochs, args.probe_lr, args.probe_train_per_class)):
        raise UsageError("--probe-seeds must be 0 or more; --probe-epochs, --probe-lr and --probe-train-per-class "
                         "greater than 0")
    args.runs = sweep(args.hvdbert, args.trainer)
    return args


def sweep(hvdbert: str, trainer: str) -> list[RunSpec]:
    """The runs, the two systems' rates interleaved (a machine whose load drifts affects both alike)."""
    from hvdbert.errors import UsageError

    ours, theirs = [], []
    for item in filter(None, hvdbert.split(",")):
        optimizer, _, lr = item.partition(":")
        if not lr:
            raise UsageError(f"--hvdbert {item!r}: expected OPTIMIZER:LR, e.g. adamw:5e-4")
        ours.append(RunSpec("hvdbert", optimizer, _rate(lr, "--hvdbert")))
    for lr in filter(None, trainer.split(",")):
        theirs.append(RunSpec("trainer", "adamw", _rate(lr, "--trainer")))
    if not ours or not theirs:
        raise UsageError("--hvdbert and --trainer each need at least one rate")
    runs = [run for pair in zip(theirs, ours) for run in pair]
    return runs + theirs[len(ours):] + ours[len(theirs):]


def _rate(text: str, flag: str) -> str:
    from hvdbert.errors import UsageError

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise UsageError(f"{flag}: learning rate {text!r} is not a positive number")
    return text


def recipe_sets(args) -> list[str]:
    """The recipe both systems train: the flags' values, then the user's --set. The rate is stated
    for the global batch it is used at (no LR scaling), and every save is kept."""
    return [f"batch.global_batch_size={args.global_batch_size}", f"train.max_steps={args.steps}",
            f"checkpoint.every_steps={args.save_every}", f"checkpoint.keep={args.steps // args.save_every + 1}",
            f"train.log_every={args.save_every}", "train.progress_bar=false",
            f"optim.reference_global_batch_size={args.global_batch_size}", *args.set]


def run_sets(args, run: RunSpec) -> list[str]:
    return [*recipe_sets(args), f"optim.lr={run.lr}"] + ([f"optim.name={run.optimizer}"]
                                                          if run.system == "hvdbert" else [])


# ------------------------------------------------------------------------------------------------
# Training (each run in a child process)


class CpuClock:
    """Training CPU time: the process's user + system time (all threads) since start(), less the time
    spent in excluded() blocks (saving). Wall time alike, for reference."""

    def __init__(self, path: Path):
        self.path = path
        self.cpu_start = self.wall_start = 0.0
        self.cpu_excluded = self.wall_excluded = 0.0

    def start(self) -> None:
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()

    def pause(self) -> tuple[float, float]:
        return time.process_time(), time.perf_counter()

    def resume(self, paused: tuple[float, float]) -> None:
        self.cpu_excluded += time.process_time() - paused[0]
        self.wall_excluded += time.perf_counter() - paused[1]

    @contextlib.contextmanager
    def excluded(self):
        paused = self.pause()
        try:
            yield
        finally:
            self.resume(paused)

    def record(self, step: int, samples: int, at: tuple[float, float] | None = None) -> None:
        cpu, wall = at or self.pause()
        row = {"step": step, "samples": samples,
               "cpu_seconds": cpu - self.cpu_start - self.cpu_excluded,
               "wall_seconds": wall - self.wall_start - self.wall_excluded}
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


def train_hvdbert(spec: dict) -> None:
    """pretrain's one-process run, with the clock read after every saving step and stopped while saving."""
    import logging

    import torch.utils.tensorboard  # noqa: F401 - RunMetrics' import, paid before the clock starts
    import tqdm  # noqa: F401

    from hvdbert import checkpoint
    from hvdbert.config import load_recipe
    from hvdbert.dist import init_distributed
    from hvdbert.hooks import StepHook
    from hvdbert.metrics import setup_logging
    from hvdbert.run import build_run
    from hvdbert.rundir import prepare_run_dir, resolved_recipe, train_once

    class ClockReading(StepHook):
        """Reads the clock at every saving step (after the save, which the clock does not count)."""

        def step_end(self, run) -> None:
            if run.state.step % checkpointer.every_steps == 0 or run.state.step == run.plan.max_steps:
                clock.record(run.state.step, run.state.samples_seen)

    class Untimed(StepHook):
        """`inner`'s work at each point, with the clock stopped: writing a checkpoint is not training."""

        def __init__(self, inner: StepHook):
            self.inner = inner

        def step_end(self, run) -> None:
            with clock.excluded():
                self.inner.step_end(run)

        def run_end(self, run, stopped: bool) -> None:
            with clock.excluded():
                self.inner.run_end(run, stopped)

        def diverged(self, run):
            with clock.excluded():
                return self.inner.diverged(run)

    recipe = load_recipe(spec["recipe"], spec["sets"])
    dist = init_distributed(recipe.dist)
    setup_logging(dist)
    run = build_run(recipe, Path(spec["data"]), dist)
    logging.getLogger("hvdbert").info(
        "hvdbert: global batch %d = %d micro x %d accumulation, %d steps, lr %s", run.plan.global_batch_size,
        run.plan.micro_batch_size, run.plan.accumulation_steps, run.plan.max_steps, run.plan.lr_derivation)
    run.broadcast_from_rank0()
    run_dir = Path(spec["run_dir"])
    resolved = resolved_recipe(run)
    prepare_run_dir(run_dir, resolved, None, 0)
    clock = CpuClock(run_dir / CLOCK)
    checkpointer = checkpoint.Checkpointer(run, run_dir, resolved)
    clock.start()
    train_once(run, run_dir, [Untimed(checkpointer), ClockReading()])
    dist.shutdown()


def train_trainer(spec: dict) -> None:
    """run_mlm.py's recipe (no --line_by_line) on the data's training documents."""
    import torch
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from hvdbert.bench.peers.data import model_from_spec, run_mlm_dataset, trainer_levers, training_documents
    from hvdbert.config import load_recipe

    recipe = load_recipe(spec["recipe"], spec["sets"])
    torch.set_num_threads(recipe.dist.threads_per_worker)
    documents = training_documents(Path(spec["data"]), spec["input"], spec["text_field"], spec["text_documents"])
    tokenizer, dataset = run_mlm_dataset(Path(spec["data"]), recipe.data.max_seq_len, documents)
    torch.manual_seed(recipe.train.seed)
    model = model_from_spec({"model": recipe.model}, tokenizer)
    run_dir = Path(spec["run_dir"])
    clock = CpuClock(run_dir / CLOCK)
    micro, steps = recipe.batch.micro_batch_size, recipe.train.max_steps
    global_batch = recipe.batch.global_batch_size

    class Clock(TrainerCallback):
        """Reads the clock at the end of every saving step and stops it until the save is done."""

        paused = None

        def on_train_begin(self, args, state, control, **kwargs):
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            if control.should_save:  # set by DefaultFlowCallback, which runs first
                self.paused = clock.pause()
                clock.record(state.global_step, state.global_step * global_batch, self.paused)

        def on_save(self, args, state, control, **kwargs):
            clock.resume(self.paused)

    training_args = TrainingArguments(
        output_dir=str(run_dir), per_device_train_batch_size=micro, gradient_accumulation_steps=global_batch // micro,
        max_steps=steps, learning_rate=float(spec["lr"]), seed=recipe.train.seed, save_strategy="steps",
        save_steps=recipe.checkpoint.every_steps, save_only_model=True, logging_strategy="steps",
        logging_steps=recipe.checkpoint.every_steps, report_to="none", disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        **trainer_levers(recipe.train.precision, recipe.train.compile),  # what --set gives hvdbert
    )
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=recipe.data.mask_prob)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    (run_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n",
                                              encoding="utf-8")


def child_main(args) -> int:
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    (train_hvdbert if args.child == "hvdbert" else train_trainer)(spec)
    return 0


def train(args, run: RunSpec, run_dir: Path, threads: int) -> None:
    """Train `run` into `run_dir` in a child process, unless a complete run of the same spec is there."""
    from hvdbert.bench.orchestrate import child_env
    from hvdbert.errors import UsageError

    spec = {"system": run.system, "optimizer": run.optimizer, "lr": run.lr, "recipe": str(Path(args.recipe).resolve()),
            "sets": run_sets(args, run), "data": str(args.data.resolve()), "input": args.input,
            "text_field": args.text_field, "text_documents": args.text_documents, "run_dir": str(run_dir.resolve())}
    if (run_dir / DONE).is_file():
        done = json.loads((run_dir / DONE).read_text(encoding="utf-8"))
        if done["spec"] != spec:
            raise UsageError(f"{run_dir} holds a run of other settings; choose another --workdir (or remove it)")
        return
    shutil.rmtree(run_dir, ignore_errors=True)  # an incomplete run starts again
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "bench.time_to_quality", "--child", run.system, "--spec", str(run_dir / "spec.json")]
    print(f"time_to_quality: training {run.label} ...", flush=True)
    started = time.perf_counter()
    with open(run_dir / "train.log", "w", encoding="utf-8") as log:
        completed = subprocess.run(command, cwd=REPO, env=child_env(threads), stdout=log, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        tail = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        if completed.returncode == 2 and tail.strip():  # a refusal: its one line
            raise UsageError(tail.strip().splitlines()[-1].split("error: ", 1)[-1])
        raise RuntimeError(f"{' '.join(command)} exited {completed.returncode}:\n{tail}")
    (run_dir / DONE).write_text(json.dumps({"spec": spec, "seconds": time.perf_counter() - started}) + "\n",
                                encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# Evaluation (this process, after training)


class Evaluator:
    """Every saved model through hvdbert.evaluate.evaluate(): the same held-out sequences, masks,
    micro-batches, threads and precision for both systems."""

    def __init__(self, recipe, data_dir: Path):
        import torch

        from hvdbert.data.shards import PreparedData
        from hvdbert.dist import SingleProcess
        from hvdbert.evaluate import HeldOut
        from hvdbert.state import Precision

        train_data = PreparedData(data_dir)
        self.held_out = HeldOut(PreparedData(data_dir / train_data.manifest.validation_dir), recipe.eval,
                                recipe.batch.micro_batch_size, train_data.token_counts())
        self.device = torch.device("cpu")
        self.autocast = Precision.create(recipe.train.precision, self.device).autocast
        self.dist = SingleProcess()

    def hvdbert(self, path: Path):
        from hvdbert import checkpoint
        from hvdbert.model import build_model

        found = checkpoint.open_checkpoint(path)
        model = build_model(found.recipe["model"], with_nsp=False)
        checkpoint.load_weights(model, found.weights(), found.path / checkpoint.WEIGHTS)
        return model

    def trainer(self, path: Path):
        from hvdbert.evaluate import load_transformers_mlm

        return load_transformers_mlm(path, self.held_out.data)

    def __call__(self, system: str, path: Path) -> dict:
        from hvdbert.evaluate import evaluate

        model = getattr(self, system)(path)
        return evaluate(model, self.held_out, self.dist, self.device, self.autocast)


def saved_model(system: str, run_dir: Path, step: int) -> Path:
    return run_dir / ("checkpoints" if system == "hvdbert" else "") / (
        f"step-{step}" if system == "hvdbert" else f"checkpoint-{step}")


def baseline_sentence(row: dict) -> str:
    """What the report says of the unigram baseline of `row`'s held-out tokens."""
    if "eval_unigram_cross_entropy" not in row:
        return "no unigram baseline (the data was prepared before hvdbert stored its training token counts)."
    return (f"a predictor of the training data's token frequencies (no context) reaches "
            f"{row['eval_unigram_cross_entropy']:.4f} on them: a loss below it has learned from the context.")


def evaluate_run(run: RunSpec, run_dir: Path, evaluator: Evaluator) -> list[dict]:
    """One row per save of `run` (cached in RUN_DIR/eval.jsonl)."""
    cache = run_dir / "eval.jsonl"
    done = {r["step"]: r for r in map(json.loads, cache.read_text().splitlines())} if cache.is_file() else {}
    rows = []
    for clock in map(json.loads, (run_dir / CLOCK).read_text(encoding="utf-8").splitlines()):
        if clock["step"] not in done:
            figures = evaluator(run.system, saved_model(run.system, run_dir, clock["step"]))
            done[clock["step"]] = {"system": run.system, "optimizer": run.optimizer, "lr": run.lr, **clock,
                                   **{k: figures[k] for k in ("eval_loss", "eval_mlm_accuracy", "eval_perplexity",
                                                              "eval_sequences", "eval_unigram_cross_entropy")
                                      if k in figures}}  # no baseline: data prepared without token counts
            with open(cache, "a", encoding="utf-8") as out:
                out.write(json.dumps(done[clock["step"]]) + "\n")
        rows.append(done[clock["step"]])
    return rows


# ------------------------------------------------------------------------------------------------
# The headline


def cpu_to_reach(curve: list[dict], target: float, x: str = "cpu_seconds") -> dict:
    """Where `curve` (rows in step order) first gets to eval_loss <= target: `x` interpolated linearly
    between the last save above the target and the first at or below it (the first save's own `x`
    when that one is already there: nothing earlier was measured), and `x` at that first save. None
    when it never gets there."""
    for i, row in enumerate(curve):
        if row["eval_loss"] <= target:
            if i == 0:
                return {"interpolated": row[x], "first_save": row[x], "step": row["step"]}
            before = curve[i - 1]
            share = (before["eval_loss"] - target) / (before["eval_loss"] - row["eval_loss"])
            return {"interpolated": before[x] + share * (row[x] - before[x]), "first_save": row[x],
                    "step": row["step"]}
    return {"interpolated": None, "first_save": None, "step": None}


def best_runs(curves: dict[RunSpec, list[dict]]) -> dict[str, RunSpec]:
    """Each system's run with the lowest final held-out loss."""
    return {system: min((run for run in curves if run.system == system), key=lambda run: curves[run][-1]["eval_loss"])
            for system in SYSTEMS}


def headline(curves: dict[RunSpec, list[dict]]) -> dict:
    """Each system's best run and final figures, hvdbert's CPU-seconds to the Trainer's best final loss, and
    both systems' CPU-seconds to the higher of their best final losses."""
    best = best_runs(curves)
    trainer_final, ours = curves[best["trainer"]][-1], curves[best["hvdbert"]]
    target = trainer_final["eval_loss"]
    reach = cpu_to_reach(ours, target)
    samples = cpu_to_reach(ours, target, "samples")
    ratio = lambda v: None if v is None else v / trainer_final["cpu_seconds"]  # noqa: E731
    # The higher of the two best final losses: both best runs reach it, so the ratio is defined even
    # when hvdbert's best stays above the Trainer's (the same quality, each system's CPU-seconds).
    common = max(target, ours[-1]["eval_loss"])
    to_common = {system: cpu_to_reach(curves[run], common)["interpolated"] for system, run in best.items()}
    return {
        "best": {system: {"optimizer": run.optimizer, "lr": run.lr, "final": curves[run][-1]}
                 for system, run in best.items()},
        "target_eval_loss": target,
        "trainer_cpu_seconds": trainer_final["cpu_seconds"],
        "hvdbert_cpu_seconds_to_target": reach["interpolated"],
        "hvdbert_cpu_seconds_to_target_first_save": reach["first_save"],
        "hvdbert_samples_to_target": samples["interpolated"],
        "cpu_ratio": ratio(reach["interpolated"]),
        "cpu_ratio_first_save": ratio(reach["first_save"]),
        "common_eval_loss": common,
        "cpu_seconds_to_common": to_common,
        "cpu_ratio_common": to_common["hvdbert"] / to_common["trainer"],
        "target_ratio": 0.40,  # the BERT-mini target: at most 40% of the Trainer's CPU time
        "reach_per_run": {run.name: cpu_to_reach(curve, target) for run, curve in curves.items() if run.system == "hvdbert"},
    }


# ------------------------------------------------------------------------------------------------
# The probe


def probe_flags(args) -> list[str]:
    """The hvdbert.finetune flags given by --probe-*; finetune's own defaults for the others."""
    flags = []
    for flag, value in (("--epochs", args.probe_epochs), ("--lr", args.probe_lr),
                        ("--train-per-class", args.probe_train_per_class)):
        if value is not None:
            flags += [flag, format(value, "g")]
    return flags


def probe(args, best: dict[str, RunSpec], workdir: Path, threads: int) -> list[dict]:
    """hvdbert.finetune --task builtin on both best final models and from scratch, --probe-seeds seeds."""
    from hvdbert.bench.orchestrate import child_env

    flags = probe_flags(args)
    # results are kept per setting: a probe with other flags is not read back as this one
    results_dir = workdir / "-".join(["probe", *(f.lstrip("-") for f in flags)])

    trainer_final = saved_model("trainer", workdir / best["trainer"].name, args.steps)
    models = [("hvdbert", best["hvdbert"].name, workdir / best["hvdbert"].name, []),  # its newest checkpoint
              ("trainer", best["trainer"].name, trainer_final, []),
              ("from scratch", "from-scratch", trainer_final, ["--from-scratch"])]  # the same shape, random weights
    results = []
    results_dir.mkdir(exist_ok=True)
    for seed in range(1, args.probe_seeds + 1):
        for name, slug, model, extra in models:
            result = results_dir / f"{slug}-seed{seed}.json"
            if not result.is_file():
                print(f"time_to_quality: probe {name}, seed {seed} ...", flush=True)
                with tempfile.TemporaryDirectory(prefix="probe-", dir=workdir) as scratch:
                    command = [sys.executable, "-m", "hvdbert.finetune", "--model", str(model), "--task", "builtin",
                               "--output", str(Path(scratch) / "model"), "--json", str(result), "--seed", str(seed),
                               *extra, *flags]
                    completed = subprocess.run(command, cwd=REPO, env=child_env(threads), capture_output=True, text=True)
                if completed.returncode != 0:
                    raise RuntimeError(f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr[-3000:]}")
            scores = json.loads(result.read_text(encoding="utf-8"))
            results.append({"model": name, "seed": seed, "train_per_class": scores.get("train_per_class", 0),
                            **{k: scores[k] for k in ("dev_accuracy", "dev_macro_f1", "dev_majority_accuracy", "epochs",
                                                      "lr", "train_examples", "dev_examples")}})
    return results


# ------------------------------------------------------------------------------------------------
# The report


def _g(value, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def report(args, recipe, curves: dict[RunSpec, list[dict]], top: dict, probes: list[dict], command: str) -> str:
    best = best_runs(curves)
    any_row = next(iter(curves.values()))[0]
    micro = recipe.batch.micro_batch_size
    lines = [
        "# Time to quality: hvdbert against transformers' Trainer (run_mlm.py's recipe)", "",
        "```bash", command, "```", "",
        f"Model: {recipe.model_field('num_hidden_layers')} layers, hidden {recipe.model_field('hidden_size')}, "
        f"vocabulary {recipe.model_field('vocab_size')}, sequence {recipe.data.max_seq_len}; global batch "
        f"{args.global_batch_size} ({micro} x {args.global_batch_size // micro} accumulated), {args.steps} steps "
        f"({args.steps * args.global_batch_size:,} sequences) per run, one process with "
        f"{recipe.dist.threads_per_worker} thread(s) each, a save every {args.save_every} steps. Held-out: "
        f"{any_row['eval_sequences']} sequences of {args.data}/validation, 15% masked with eval.seed "
        f"{recipe.eval.seed}; {baseline_sentence(any_row)}", "",
        f"## The sweep: final held-out loss at step {args.steps}", "",
        "| system | optimizer | lr | held-out loss | MLM accuracy | CPU-s | wall s | CPU-s to the Trainer's best |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for run, curve in sorted(curves.items(), key=lambda item: (item[0].system, item[0].optimizer, float(item[0].lr))):
        final = curve[-1]
        reach = top["reach_per_run"].get(run.name, {}).get("interpolated")
        mark = " (best)" if run in best.values() else ""
        lines.append(f"| {SYSTEMS[run.system]} | {run.optimizer} | {run.lr}{mark} | {final['eval_loss']:.4f} | "
                     f"{final['eval_mlm_accuracy']:.4f} | {final['cpu_seconds']:.1f} | {final['wall_seconds']:.1f} | "
                     f"{_g(reach, '.1f') if run.system == 'hvdbert' else ''} |")
    ratio, first = top["cpu_ratio"], top["cpu_ratio_first_save"]
    ours = top["best"]["hvdbert"]
    lines += [
        "", "## Headline", "",
        f"- The Trainer's best final held-out loss: **{top['target_eval_loss']:.4f}** (AdamW lr "
        f"{top['best']['trainer']['lr']}), after {top['trainer_cpu_seconds']:.1f} CPU-seconds.",
        f"- hvdbert's best final held-out loss: **{ours['final']['eval_loss']:.4f}** ({ours['optimizer']} lr "
        f"{ours['lr']}), after {ours['final']['cpu_seconds']:.1f} CPU-seconds.",
    ]
    if ratio is None:
        lines.append("- hvdbert's best run did not reach the Trainer's best final loss.")
    else:
        lines.append(f"- hvdbert's best run first reached the Trainer's best final loss after "
                     f"**{top['hvdbert_cpu_seconds_to_target']:.1f} CPU-seconds** (interpolated between saves; "
                     f"{top['hvdbert_samples_to_target']:,.0f} sequences): **{ratio:.2f}x** the Trainer's CPU-seconds "
                     f"(at the first save at or below it: {top['hvdbert_cpu_seconds_to_target_first_save']:.1f}, "
                     f"{first:.2f}x). Target: at most {top['target_ratio']:.2f}x.")
    lines.append(f"- To the higher of the two best final losses, {top['common_eval_loss']:.4f}, which both best runs "
                 f"reach: hvdbert {top['cpu_seconds_to_common']['hvdbert']:.1f} CPU-seconds, the Trainer "
                 f"{top['cpu_seconds_to_common']['trainer']:.1f} (each interpolated between saves): "
                 f"**{top['cpu_ratio_common']:.2f}x**.")
    lines += ["", "## The best runs, save by save", "",
              "| step | sequences | hvdbert CPU-s | hvdbert loss | Trainer CPU-s | Trainer loss |",
              "|---:|---:|---:|---:|---:|---:|"]
    theirs = {r["step"]: r for r in curves[best["trainer"]]}
    for row in curves[best["hvdbert"]]:
        other = theirs.get(row["step"], {})
        lines.append(f"| {row['step']} | {row['samples']:,} | {row['cpu_seconds']:.1f} | {row['eval_loss']:.4f} | "
                     f"{_g(other.get('cpu_seconds'), '.1f')} | {_g(other.get('eval_loss'))} |")
    if probes:
        lines += ["", f"## The probe: hvdbert.finetune --task builtin, {args.probe_seeds} seed(s)", "",
                  "| model | seeds | dev accuracy: mean | min-max | macro-F1: mean | min-max |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, summary in probe_summary(probes).items():
            lines.append(f"| {name} | {summary['seeds']} | {summary['accuracy_mean']:.4f} | "
                         f"{summary['accuracy_min']:.4f}-{summary['accuracy_max']:.4f} | {summary['macro_f1_mean']:.4f} | "
                         f"{summary['macro_f1_min']:.4f}-{summary['macro_f1_max']:.4f} |")
        first = probes[0]
        few = f" (at most {first['train_per_class']} per class)" if first["train_per_class"] else ""
        lines += ["", f"Majority class: {first['dev_majority_accuracy']:.4f}; {first['train_examples']} training{few} "
                  f"and {first['dev_examples']} dev examples, {first['epochs']:g} epoch(s) at lr {first['lr']:g}."]
    return "\n".join(lines) + "\n"


def probe_summary(probes: list[dict]) -> dict[str, dict]:
    out = {}
    for name in dict.fromkeys(p["model"] for p in probes):
        accuracy = [p["dev_accuracy"] for p in probes if p["model"] == name]
        f1 = [p["dev_macro_f1"] for p in probes if p["model"] == name]
        out[name] = {"seeds": len(accuracy), "accuracy_mean": statistics.mean(accuracy), "accuracy_min": min(accuracy),
                     "accuracy_max": max(accuracy), "macro_f1_mean": statistics.mean(f1), "macro_f1_min": min(f1),
                     "macro_f1_max": max(f1)}
    return out


def plot(curves: dict[RunSpec, list[dict]], top: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"hvdbert": "C0", "trainer": "C1"}
    best = best_runs(curves).values()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for run, curve in curves.items():
        is_best = run in best
        for axis, x in zip(axes, ("samples", "cpu_seconds")):
            axis.plot([r[x] for r in curve], [r["eval_loss"] for r in curve], color=colours[run.system],
                      linewidth=2.2 if is_best else 0.8, alpha=1.0 if is_best else 0.5,
                      marker="o" if is_best else None, markersize=3,
                      label=run.label + (" (best)" if is_best else ""))
    baseline = next(iter(curves.values()))[0].get("eval_unigram_cross_entropy")
    for axis, x in zip(axes, ("samples", "CPU-seconds")):
        axis.axhline(top["target_eval_loss"], color="grey", linestyle="--", linewidth=0.8,
                     label="the Trainer's best final loss")
        if baseline is not None:
            axis.axhline(baseline, color="grey", linestyle=":", linewidth=0.8,
                         label="training-unigram predictor (no context)")
        axis.set(xlabel=x, title=f"held-out loss against {x}")
    if top["hvdbert_cpu_seconds_to_target"] is not None:
        axes[1].axvline(top["hvdbert_cpu_seconds_to_target"], color=colours["hvdbert"], linestyle="--", linewidth=0.8)
        axes[1].axvline(top["trainer_cpu_seconds"], color=colours["trainer"], linestyle="--", linewidth=0.8)
    axes[0].set_ylabel("held-out masked-LM loss (nats)")
    axes[0].legend(fontsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from hvdbert.errors import cli_entry

    return cli_entry("bench.time_to_quality")(_main)(argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)

    import torch

    from hvdbert.bench.peers.data import training_documents
    from hvdbert.config import load_recipe
    from hvdbert.data.shards import PreparedData
    from hvdbert.errors import UsageError
    from hvdbert.plan import make_plan
    from hvdbert.preflight import check_data

    # Everything that can be refused is refused before the first run starts.
    for run in args.runs:
        make_plan(load_recipe(args.recipe, run_sets(args, run)), 1)
    recipe = load_recipe(args.recipe, recipe_sets(args))
    data = PreparedData(args.data)
    check_data(data, recipe)
    if not data.manifest.validation_dir:
        raise UsageError(f"--data {args.data}: no held-out split; prepare it with --validation-fraction 0.05")
    training_documents(args.data, args.input, args.text_field, args.text_documents)  # the Trainer's text is the data's
    threads = recipe.dist.threads_per_worker
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)

    for run in args.runs:
        train(args, run, args.workdir / run.name, threads)
    torch.set_num_threads(threads)  # evaluation: the training runs' arithmetic
    evaluator = Evaluator(recipe, args.data)
    curves = {run: evaluate_run(run, args.workdir / run.name, evaluator) for run in args.runs}
    with open(args.output / "quality.jsonl", "w", encoding="utf-8") as out:
        for curve in curves.values():
            out.writelines(json.dumps(row) + "\n" for row in curve)
    top = headline(curves)
    probes = probe(args, best_runs(curves), args.workdir, threads) if args.probe_seeds else []

    command = "python -m bench.time_to_quality " + " ".join(argv if argv is not None else sys.argv[1:])
    table = report(args, recipe, curves, top, probes, command)
    (args.output / "quality.md").write_text(table, encoding="utf-8")
    plot(curves, top, args.output / "quality.png",
         f"{recipe.model_field('num_hidden_layers')} layers, hidden {recipe.model_field('hidden_size')}, vocabulary "
         f"{recipe.model_field('vocab_size')}, seq {recipe.data.max_seq_len}, global batch {args.global_batch_size}, "
         f"{threads} thread(s) per process, CPU")
    summary = {**top, "command": command, "runs": [asdict(run) for run in args.runs],
               "probe": probes, "probe_summary": probe_summary(probes) if probes else {}}
    (args.output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(table, end="")
    print(f"time_to_quality: wrote {args.output}/quality.jsonl, quality.md, quality.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
