"""The training loop: `train()` runs steps and logs; `train_step()` is one optimizer step."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from hvdbert.data.loader import BatchStream
from hvdbert.dist import SingleProcess
from hvdbert.metrics import NullMetrics
from hvdbert.model import pretraining_loss
from hvdbert.optim import lr_at, set_lr
from hvdbert.plan import Plan

# Per-step statistics, summed locally and reduced across ranks only when a step is logged.
STAT_NAMES = ("loss", "mlm_loss", "nsp_loss", "mlm_correct", "mlm_count", "micro_batches", "tokens")


@dataclass
class TrainState:
    """Progress counters; they travel with the model state in checkpoints."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global sample position: the data stream resumes from here

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])


@dataclass
class Precision:
    """Autocast and loss scaling for train.precision."""

    name: str
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, name: str, device: torch.device) -> "Precision":
        scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None
        return cls(name, device, scaler)

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def train_step(model, optimizer, micro_batches: list[dict[str, torch.Tensor]], dist: SingleProcess,
               precision: Precision, grad_clip_norm: float) -> torch.Tensor:
    """Forward/backward over this worker's micro-batches, allreduce, clip, step.

    Returns the step's statistics (STAT_NAMES) as one tensor, without a host sync.
    """
    accumulation_steps = len(micro_batches)
    stats = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=precision.device)
    for batch in micro_batches:
        batch = {k: v.to(precision.device, non_blocking=True) for k, v in batch.items() if k != "sample_ids"}
        with precision.autocast():
            out = pretraining_loss(model, batch)
        # Horovod sums the local passes of a step (backward_passes_per_step) before averaging across
        # workers, so each pass contributes loss / accumulation_steps.
        loss = out.loss / accumulation_steps
        (precision.scaler.scale(loss) if precision.scaler else loss).backward()
        stats += torch.stack([
            out.loss.detach().double(), out.mlm_loss.detach().double(),
            out.nsp_loss.detach().double() if out.nsp_loss is not None else stats.new_zeros(()),
            out.mlm_correct.double(), out.mlm_count.double(), stats.new_ones(()),
            # real tokens: packed MLM sequences have no padding; padded formats carry a mask
            batch["attention_mask"].sum().double() if "attention_mask" in batch
            else stats.new_tensor(float(batch["input_ids"].numel())),
        ])

    dist.synchronize(optimizer)  # gradients are averaged across workers from here on
    if precision.scaler:
        precision.scaler.unscale_(optimizer)
    if grad_clip_norm > 0:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, grad_clip_norm)
    with dist.skip_synchronize(optimizer):
        if precision.scaler:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
    optimizer.zero_grad()  # Horovod's zero_grad takes no arguments; torch sets grads to None
    return stats


def train(model, optimizer, stream: BatchStream, plan: Plan, state: TrainState, dist: SingleProcess,
          precision: Precision, grad_clip_norm: float, log_every: int,
          metrics: NullMetrics, sample_log=None) -> dict:
    """Run optimizer steps until plan.max_steps; log every `log_every` steps. Returns a summary."""
    model.train()
    window = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=precision.device)
    window_steps, window_start = 0, time.perf_counter()
    data_wait_seconds = 0.0
    run_start, first_step, last_record = time.perf_counter(), state.step, None
    while state.step < plan.max_steps:
        wait_start = time.perf_counter()
        micro_batches = stream.next_step()
        data_wait_seconds += time.perf_counter() - wait_start
        if sample_log is not None:
            sample_log.write(" ".join(str(int(i)) for b in micro_batches for i in b["sample_ids"]) + "\n")
        lr = lr_at(state.step, plan)
        set_lr(optimizer, lr)
        window += train_step(model, optimizer, micro_batches, dist, precision, grad_clip_norm)
        state.step += 1
        state.samples_seen += plan.global_batch_size
        window_steps += 1
        metrics.advance(1)

        if state.step % log_every == 0 or state.step == plan.max_steps:
            # One allreduce per logged step (not per step): the only cross-rank sync besides gradients.
            totals = dist.allreduce_sum(window, name="metrics").tolist()
            seconds = time.perf_counter() - window_start
            stat = dict(zip(STAT_NAMES, totals))
            micro = max(stat["micro_batches"], 1.0)
            last_record = {
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
                "samples_seen": state.samples_seen,
                "data_wait_fraction": data_wait_seconds / seconds,
            }
            if stream.data.has_nsp:
                last_record["nsp_loss"] = stat["nsp_loss"] / micro
            metrics.log(last_record)
            window.zero_()
            window_steps, window_start, data_wait_seconds = 0, time.perf_counter(), 0.0
    seconds = time.perf_counter() - run_start
    steps = state.step - first_step
    return {
        "steps": state.step,
        "samples_seen": state.samples_seen,
        "final_loss": last_record["loss"] if last_record else float("nan"),
        "mean_seq_per_s": steps * plan.global_batch_size / seconds if seconds > 0 else 0.0,
    }
