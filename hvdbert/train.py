"""The training loop: `train()` runs steps and logs them, its side concerns on a list of step hooks;
`train_step()` is one optimizer step."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from hvdbert.data.loader import StreamLayout
from hvdbert.data.masking import splitmix64
from hvdbert.dist import Distributed
from hvdbert.hooks import StepHook
from hvdbert.metrics import NullMetrics
from hvdbert.model import STAT_NAMES, micro_batch_stats, named_stats
from hvdbert.optim import lr_at, set_lr
from hvdbert.state import Precision

if TYPE_CHECKING:
    from hvdbert.run import Run

LOSS = STAT_NAMES.index("loss")  # the step flags' allreduce checks the step's summed loss


class TrainingDiverged(RuntimeError):
    """More than train.max_bad_steps consecutive optimizer steps had a non-finite loss."""


class StepGuard:
    """Once per step, all ranks agree on two flags: stop now (a signal reached some rank) and this
    step's loss is not finite (on some rank). Every rank takes the same decision in the same step
    (one rank leaving alone would hang the others).

    The flags' allreduce is submitted as soon as the step's last loss is known, before its backward
    pass, so it completes while the backward runs and the gradients are reduced. Read after the
    gradients, they are ready: the read is a copy of two numbers, not a wait (docs/performance.md
    has the measurement). It stays a read every step because a non-finite step must be skipped
    before the optimizer applies it, and a stop must happen in a step every rank agrees on."""

    def __init__(self, stop=None):
        self.stop = stop  # checkpoint.StopRequest, or None
        self.stop_agreed = False
        self.bad_step = False
        self._pending = None

    def submit(self, dist: Distributed, loss_sum: torch.Tensor) -> None:
        stop = float(self.stop is not None and self.stop.requested)
        flags = torch.stack([loss_sum.new_tensor(stop), (~torch.isfinite(loss_sum)).to(loss_sum.dtype)])
        self._pending = dist.allreduce_sum_async(flags, name="step_flags")

    def collect(self, dist: Distributed) -> bool:
        """The agreed flags (a host sync, after the gradients' own); returns True when this step
        must not update the model."""
        stop, bad = dist.wait(self._pending).tolist()
        self.stop_agreed, self.bad_step = stop > 0, bad > 0
        return self.bad_step


def dropout_seeds(seed: int, layout: StreamLayout, samples_seen: int) -> list[int]:
    """One torch seed per micro-batch, from (recipe seed, global position of its first sample).

    Dropout then depends only on which samples a micro-batch holds: a resumed run draws the same masks
    as an uninterrupted one, and so does a run on another worker count, with no RNG state to save per
    rank (per-rank states would not even map onto a different number of ranks)."""
    firsts = np.array([layout.positions(samples_seen, a)[0] for a in range(layout.accumulation_steps)],
                      dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = splitmix64(splitmix64(np.uint64(seed)) ^ firsts)
    return [int(x) >> 1 for x in mixed]  # torch.manual_seed takes values below 2**63


def train_step(forward, optimizer, micro_batches: list[dict[str, torch.Tensor]], dist: Distributed,
               precision: Precision, grad_clip_norm: float, dropout_seeds: list[int] | None = None,
               guard: StepGuard | None = None) -> torch.Tensor:
    """Forward/backward over this worker's micro-batches, allreduce, clip, step. `forward` is the
    run's training forward (model.PretrainingForward, possibly wrapped by the distributed layer).

    Returns the step's statistics (model.MICRO_BATCH_STATS, summed) as one tensor. Without a guard
    there is no host sync; with one, a step whose loss is not finite on any rank leaves the model and
    optimizer untouched.
    """
    accumulation_steps = len(micro_batches)
    stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=precision.device)
    # Asynchronous host-to-device copies only from pinned memory, which the stream pins on CUDA only.
    non_blocking = precision.device.type == "cuda"
    for index, batch in enumerate(micro_batches):
        batch = {k: v.to(precision.device, non_blocking=non_blocking) for k, v in batch.items() if k != "sample_ids"}
        if dropout_seeds is not None:
            torch.manual_seed(dropout_seeds[index])
        with precision.autocast():
            out = forward(batch)
        stats += micro_batch_stats(out, batch, stats.new_zeros(()))
        if guard is not None and index == accumulation_steps - 1:
            # Every loss of the step is known: the flags' allreduce runs while the last backward does.
            guard.submit(dist, stats[LOSS])
        # Horovod sums the local passes of a step (backward_passes_per_step) before averaging across
        # workers, so each pass contributes loss / accumulation_steps.
        loss = out.loss / accumulation_steps
        (precision.scaler.scale(loss) if precision.scaler else loss).backward()

    dist.synchronize(optimizer)  # gradients are averaged across workers from here on
    if guard is not None and guard.collect(dist):
        optimizer.zero_grad()  # a non-finite loss somewhere: skip the update on every rank
        return stats
    if precision.scaler:
        precision.scaler.unscale_(optimizer)
    if grad_clip_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    with dist.skip_synchronize(optimizer):
        if precision.scaler:
            scale = precision.scaler.get_scale()  # a host sync, fp16 only
            precision.scaler.step(optimizer)
            precision.scaler.update()
            precision.skipped_steps += int(precision.scaler.get_scale() < scale)  # the scale backs off on skips
        else:
            optimizer.step()
    optimizer.zero_grad()  # Horovod's zero_grad takes no arguments; torch sets grads to None
    return stats


@dataclass
class StepResult:
    stats: torch.Tensor  # STAT_NAMES, this worker's sums
    lr: float
    data_wait_seconds: float  # waiting for the loader's micro-batches
    micro_batches: list[dict[str, torch.Tensor]]


def run_step(run: "Run", guard: StepGuard | None, dist: Distributed | None = None) -> StepResult:
    """One optimizer step of `run`: the next micro-batches from its stream, the LR for this step,
    per-micro-batch dropout seeds, `train_step`, and the progress counters. `train()` and the
    benchmark both run this, so what is measured is what trains. `dist` stands in for `run.dist`
    (the benchmark passes one with clocks on it)."""
    stream = run.stream
    wait_start = time.perf_counter()
    micro_batches = stream.next_step()
    data_wait_seconds = time.perf_counter() - wait_start
    lr = lr_at(run.state.step, run.plan)
    set_lr(run.optimizer, lr)
    seeds = dropout_seeds(run.recipe.train.seed, stream.layout, run.state.samples_seen)
    stats = train_step(run.forward, run.optimizer, micro_batches, dist or run.dist, run.precision,
                       run.recipe.train.grad_clip_norm, seeds, guard)
    run.state.advance(stream.layout)
    return StepResult(stats, lr, data_wait_seconds, micro_batches)


def train(run: "Run", metrics: NullMetrics, hooks: Sequence[StepHook] = (), stop=None) -> dict:
    """Run optimizer steps on `run.stream` until the plan's max_steps (or an agreed stop); log every
    train.log_every steps. Returns a summary.

    `hooks` (hooks.StepHook: checkpoints, evaluation, sample logs, ...) are called in list order at
    the points StepHook names; `stop` (checkpoint.StopRequest) is part of the step's agreement."""
    cfg, plan, state, precision = run.recipe.train, run.plan, run.state, run.precision
    run.model.train()
    guard = StepGuard(stop)
    window = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=precision.device)
    window_steps, window_start, data_wait_seconds = 0, time.perf_counter(), 0.0
    run_start, first_step, last_record, bad_steps, stopped = time.perf_counter(), state.step, None, 0, ""
    while state.step < plan.max_steps:
        result = run_step(run, guard)
        data_wait_seconds += result.data_wait_seconds
        for hook in hooks:
            hook.after_step(run, result)
        window += result.stats
        bad_steps = bad_steps + 1 if guard.bad_step else 0
        window_steps += 1
        metrics.advance(1)

        hook_wants_log = [hook.log_due(run) for hook in hooks]  # every hook is asked: each notes its own due
        if (state.step % cfg.log_every == 0 or state.step == plan.max_steps or guard.stop_agreed
                or any(hook_wants_log)):
            last_record = log_window(run, window, window_steps, time.perf_counter() - window_start,
                                     data_wait_seconds, result.lr)
            for hook in hooks:
                hook.on_log(run, last_record)
            metrics.log(last_record)
            window.zero_()
            window_steps, window_start, data_wait_seconds = 0, time.perf_counter(), 0.0
        if bad_steps > cfg.max_bad_steps:
            named = [found for found in (hook.diverged(run) for hook in hooks) if found is not None]
            raise TrainingDiverged(f"{bad_steps} consecutive steps (up to step {state.step}) had a non-finite "
                                   f"loss, more than train.max_bad_steps = {cfg.max_bad_steps}; diagnostic "
                                   f"checkpoint: {named[0] if named else None}; lower optim.lr or check the data")
        if guard.stop_agreed:
            stopped = stop.signal_name if stop is not None and stop.requested else "signal on another rank"
            break
        for hook in hooks:
            hook.step_end(run)
    for hook in hooks:
        hook.run_end(run, bool(stopped))  # the end of the run, or a preemption: never lose a step
    seconds = time.perf_counter() - run_start
    summary = {
        "steps": state.step,
        "samples_seen": state.samples_seen,
        "final_loss": last_record["loss"] if last_record else float("nan"),
        "final_mlm_accuracy": last_record["mlm_accuracy"] if last_record else float("nan"),
        "mean_seq_per_s": (state.step - first_step) * plan.global_batch_size / seconds if seconds > 0 else 0.0,
        "stopped_by": stopped,
        "scaler_skipped_steps": precision.skipped_steps,
        "eval": {},  # the last held-out figures, when an evaluation hook ran
    }
    for hook in hooks:
        summary.update(hook.summary())
    return summary


def log_window(run: "Run", window: torch.Tensor, window_steps: int, seconds: float, data_wait_seconds: float,
               lr: float) -> dict:
    """The metrics record of the steps since the last one: one allreduce (the only cross-rank sync
    besides gradients and the step flags)."""
    plan, state, precision = run.plan, run.state, run.precision
    stat = named_stats(run.dist.allreduce_sum(window, name="metrics"))
    micro = max(stat["micro_batches"], 1.0)
    record = {
        "step": state.step,
        "loss": stat["loss"] / micro,
        "mlm_loss": stat["mlm_loss"] / micro,
        "mlm_accuracy": stat["mlm_correct"] / max(stat["mlm_count"], 1.0),
        "lr": lr,
        "workers": plan.workers,
        "global_batch_size": plan.global_batch_size,
        "micro_batch_size": plan.micro_batch_size,
        "accumulation_steps": plan.accumulation_steps,
        "seq_per_s": window_steps * plan.global_batch_size / seconds,
        "tokens_per_s": stat["tokens"] / seconds,
        # real (non-padding) tokens of all the sequences' positions: 1.0 for packed MLM data
        "real_token_fraction": stat["tokens"] / (micro * plan.micro_batch_size * plan.max_seq_len),
        "samples_seen": state.samples_seen,
        "data_wait_fraction": data_wait_seconds / seconds,
    }
    if run.data.has_nsp:
        record["nsp_loss"] = stat["nsp_loss"] / micro
    if precision.scaler is not None:
        record["scaler_skipped_steps"] = precision.skipped_steps
    return record
