"""What a training run does to its run directory (pretrain's --output, RUN_DIR).

`prepare_run_dir` readies it before the first step (refusing a used one, or cutting a resumed one's
logs back to its checkpoint) and writes recipe.json; `train_once` trains into it (metrics.jsonl and
TensorBoard events on rank 0); `SampleLog` is the step hook that writes RUN_DIR/sample_ids/. The
command (pretrain.py) and the time-to-quality benchmark both train through these, so the benchmark
needs nothing of the command's internals.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from hvdbert import checkpoint
from hvdbert.dist import Distributed
from hvdbert.hooks import StepHook
from hvdbert.metrics import NullMetrics, RunMetrics
from hvdbert.preflight import refuse_used_run_dir
from hvdbert.train import train

if TYPE_CHECKING:
    from hvdbert.run import Run
    from hvdbert.train import StepResult

SAMPLE_IDS = "sample_ids"  # RUN_DIR/sample_ids/rank-<r>.txt (data.record_sample_ids)


def resolved_recipe(run: Run) -> dict:
    """RUN_DIR/recipe.json (and each checkpoint's): the recipe as resolved for this worker count."""
    return {**run.recipe.to_dict(), "plan": run.plan.to_dict(), "data_dir": str(run.data.directory),
            "with_nsp": run.data.has_nsp, "tokenizer_sha256": run.data.manifest.tokenizer_sha256}


def _rewrite_lines(path: Path, edit) -> None:
    """Replace the lines of `path` (none if missing) by edit(lines), atomically. A resumed run drops
    what was logged after its checkpoint, so the files read as if the run had never stopped."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(edit(lines)), encoding="utf-8")
    os.replace(temporary, path)


def cut_sample_logs(run_dir: Path, step: int, ranks: int) -> None:
    """Cut the sample-id logs back to `step`: line k of RUN_DIR/sample_ids/rank-<r>.txt is what rank r
    read at step k + 1, in the history that continues from `step` (a resume's checkpoint, an elastic
    job's last commit). A rank that did not exist at some steps (another worker count then) has empty
    lines for them; ranks 0..ranks-1 get their file now."""
    directory = run_dir / SAMPLE_IDS
    logs = set(directory.glob("rank-*.txt")) | {directory / f"rank-{r}.txt" for r in range(ranks)}
    if ranks:
        directory.mkdir(exist_ok=True)
    for sample_log in logs:
        _rewrite_lines(sample_log, lambda lines: lines[:step] + ["\n"] * (step - len(lines)))


def prepare_run_dir(run_dir: Path, resolved: dict, resume_step: int | None, sample_log_ranks: int) -> None:
    """A fresh run refuses a used directory; a resumed one (resume_step: its checkpoint's step, 0 when
    `--resume auto` found none) keeps metrics.jsonl and the sample-id logs up to that step."""
    refuse_used_run_dir(run_dir, resume_step is not None)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
        checkpoint.discard_later(run_dir, resume_step)
        _rewrite_lines(run_dir / "metrics.jsonl",
                       lambda lines: [line for line in lines if json.loads(line)["step"] <= resume_step])
        cut_sample_logs(run_dir, resume_step, sample_log_ranks)
    temporary = run_dir / "recipe.json.tmp"
    temporary.write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, run_dir / "recipe.json")


class SampleLog(StepHook):
    """RUN_DIR/sample_ids/rank-<r>.txt: line k holds the sample ids rank r read at step k + 1."""

    def __init__(self, run_dir: Path, rank: int):
        (run_dir / SAMPLE_IDS).mkdir(exist_ok=True)
        # line-buffered: a worker that is killed leaves whole lines for the steps it finished
        self.file = open(run_dir / SAMPLE_IDS / f"rank-{rank}.txt", "a", encoding="utf-8", buffering=1)

    def after_step(self, run: Run, result: StepResult) -> None:
        self.file.write(" ".join(str(int(i)) for b in result.micro_batches for i in b["sample_ids"]) + "\n")

    def close(self) -> None:
        self.file.close()


def open_sample_log(run_dir: Path, enabled: bool, dist: Distributed) -> SampleLog | None:
    return SampleLog(run_dir, dist.rank) if enabled else None


def train_once(run: Run, run_dir: Path, hooks: Sequence[StepHook] = (), stop=None) -> dict:
    """Train from the run's position to the end of its plan, with a stream and metrics of its own."""
    run.open_stream()
    metrics = (RunMetrics(run_dir, run.state.step, run.plan.max_steps, run.recipe.train.progress_bar)
               if run.dist.rank == 0 else NullMetrics())
    try:
        return train(run, metrics, hooks, stop)
    finally:
        run.close_stream()
        metrics.close()
