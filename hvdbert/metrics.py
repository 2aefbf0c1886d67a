"""What a run reports: metrics.jsonl, TensorBoard events and progress, on rank 0 only; and the
log lines of every rank (`setup_logging`).

Progress is a tqdm bar when stderr is a terminal. Anywhere else (horovodrun and mpirun pipe the
workers' output, a SLURM log, `2> file`) a bar's carriage returns pile up into one ever-growing
line, so a plain line is printed at every logged step (train.log_every) instead.

Other ranks get a `NullMetrics` with the same methods, so the training loop never asks for its rank.
"""
from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path


class NullMetrics:
    def log(self, record: dict) -> None:
        pass

    def advance(self, steps: int) -> None:
        pass

    def close(self) -> None:
        pass


class RunMetrics(NullMetrics):
    def __init__(self, run_dir: Path, start_step: int, max_steps: int, progress_bar: bool):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tb"))
        terminal = sys.stderr.isatty()
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True,
                        disable=not (progress_bar and terminal))
        self.progress_lines = progress_bar and not terminal
        self.max_steps = max_steps

    def log(self, record: dict) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                self.tensorboard.add_scalar(tag, value, step)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             seq_s=f"{record['seq_per_s']:.1f}", refresh=False)
        if self.progress_lines:
            print(f"hvdbert: step {step}/{self.max_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                  f"{record['seq_per_s']:.1f} seq/s", file=sys.stderr, flush=True)

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        self.tensorboard.close()
        self.jsonl.close()


def setup_logging(dist) -> None:
    """The `hvdbert` log lines of this worker (`dist`: the distributed layer, for rank and size).
    Rank 0 speaks; the others report only warnings and errors, prefixed with their rank."""
    level = logging.INFO if dist.rank == 0 else logging.WARNING
    prefix = "" if dist.size == 1 else f"[rank {dist.rank}] "
    logging.basicConfig(level=level, format=f"{prefix}%(message)s", stream=sys.stderr, force=True)
