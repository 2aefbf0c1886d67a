"""The measured loop: hvdbert's own step (`train.run_step`) on a `Run` built as pretrain builds it.

One process per worker (under horovodrun, or torch.distributed.run for the DDP peer on hvdbert's
model); rank 0 returns the complete record, the breakdown averaged over ranks.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from pathlib import Path

import torch

from hvdbert.bench.flops import (cpu_record, device_name, matmul_peak_flops, peak_memory_bytes, probe_dtype,
                                 synchronize, training_flops_per_sequence)
from hvdbert.compression import compressed_bytes, wire_bytes_per_worker
from hvdbert.config import Recipe
from hvdbert.dist import Distributed
from hvdbert.model import STAT_NAMES, count_parameters
from hvdbert.run import Run, build_run
from hvdbert.train import StepGuard, run_step

BREAKDOWN = ("data_wait", "forward_backward", "gradient_sync", "optimizer")


def wire_tx() -> tuple[int, int]:
    """Bytes and packets this host's network interfaces have sent (loopback left out), from the
    kernel's counters: what went on the wire, protocol headers and retransmissions included. A packet
    is what the interface was handed at once (with GSO up to 64 KiB), so packets count sends: many
    small messages show as many packets for few bytes."""
    sent = [0, 0]
    for device in Path("/sys/class/net").iterdir():
        counters = [device / "statistics" / name for name in ("tx_bytes", "tx_packets")]
        if device.name != "lo" and all(c.is_file() for c in counters):
            sent = [total + int(c.read_text()) for total, c in zip(sent, counters)]
    return sent[0], sent[1]


class StepTimer:
    """The distributed layer with clocks on it: train_step calls synchronize() after its last
    backward (and wait() for the step guard's flags right after), so timing those calls splits a step
    into forward+backward, gradient sync and optimizer without changing train_step. The stream it
    wraps starts the forward+backward clock once the step's micro-batches are in hand."""

    def __init__(self, dist: Distributed, device: torch.device):
        self.dist = dist
        self.device = device
        self.seconds = dict.fromkeys(BREAKDOWN, 0.0)
        self._mark = 0.0

    def __getattr__(self, name):
        return getattr(self.dist, name)

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def begin(self) -> None:
        self._mark = self._now()

    def synchronize(self, optimizer) -> None:
        now = self._now()
        self.seconds["forward_backward"] += now - self._mark
        self.dist.synchronize(optimizer)
        self._mark = self._now()
        self.seconds["gradient_sync"] += self._mark - now

    def wait(self, handle):
        # the step guard's flags, reduced together with the gradients: part of the sync wait
        now = self._now()
        self.seconds["optimizer"] += now - self._mark
        result = self.dist.wait(handle)
        self._mark = self._now()
        self.seconds["gradient_sync"] += self._mark - now
        return result

    def end(self) -> None:
        self.seconds["optimizer"] += self._now() - self._mark

    def reset(self) -> None:
        self.seconds = dict.fromkeys(BREAKDOWN, 0.0)


class TimedStream:
    """The run's stream; the forward+backward clock starts when a step's micro-batches are ready."""

    def __init__(self, stream, timer: StepTimer):
        self.stream = stream
        self.layout = stream.layout
        self.timer = timer

    def next_step(self):
        micro_batches = self.stream.next_step()
        self.timer.begin()
        return micro_batches

    def close(self) -> None:
        self.stream.close()


def measure(run: Run, warmup_steps: int, steps: int, system: str = "hvdbert") -> dict:
    """Run warm-up and timed steps of `run`; returns the record (complete on rank 0)."""
    recipe, dist, device, plan = run.recipe, run.dist, run.device, run.plan
    timer = StepTimer(dist, device)
    run.model.train()
    tokens_index, loss_index = STAT_NAMES.index("tokens"), STAT_NAMES.index("loss")

    dist.barrier()  # every rank probes at once, as every rank trains at once
    peak_flops = matmul_peak_flops(device, probe_dtype(recipe.train.precision))
    dist.barrier()

    run.stream = TimedStream(run.open_stream(), timer)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    loss_sums = []  # per step, this worker's sum over its micro-batches: reduced once, at the end
    guard = StepGuard()
    start = cpu_start = 0.0
    for step in range(warmup_steps + steps):
        if step == warmup_steps:  # the timed window starts here
            synchronize(device)
            timer.reset()
            tokens.zero_()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            wire_start = wire_tx()
        result = run_step(run, guard, dist=timer)
        timer.seconds["data_wait"] += result.data_wait_seconds
        timer.end()
        tokens += result.stats[tokens_index]
        loss_sums.append(result.stats[loss_index])
    synchronize(device)
    elapsed, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    # every process of a host counts its host's interfaces
    wire_sent, packets_sent = (now - then for now, then in zip(wire_tx(), wire_start))
    run.close_stream()
    # Probed again after the run, the best of the two: on a shared machine a probe that happened to
    # share its core with other work would understate the peak and overstate MFU.
    peak_flops = max(peak_flops, matmul_peak_flops(device, probe_dtype(recipe.train.precision)))

    # One reduction at the end: total tokens, summed peaks, CPU time and breakdown of all ranks.
    local = torch.tensor([tokens.item(), peak_flops, cpu_seconds, wire_sent / dist.local_size,
                          packets_sent / dist.local_size, *(timer.seconds[k] for k in BREAKDOWN)], dtype=torch.float64)
    totals = dist.allreduce_sum(local, name="bench").tolist()
    total_tokens, total_peak, total_cpu_seconds, total_wire, total_packets = totals[:5]
    micro_batches_per_step = dist.size * plan.accumulation_steps
    step_losses = [v / micro_batches_per_step for v in
                   dist.allreduce_sum(torch.stack(loss_sums).double().cpu(), name="bench_losses").tolist()]
    breakdown = {k: v / dist.size / steps for k, v in zip(BREAKDOWN, totals[5:])}
    seq_per_s = steps * plan.global_batch_size / elapsed
    model_flops_per_seq = training_flops_per_sequence(recipe.model, plan.max_seq_len, plan.max_predictions_per_seq)
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    shapes = [p.shape for p in run.model.parameters() if p.requires_grad]
    payload = (compressed_bytes(shapes, recipe.dist.wire_compression, recipe.dist.powersgd_rank)
               if dist.size > 1 else 0)
    memory, memory_kind = peak_memory_bytes(device)
    return {
        "system": system,
        "workers": dist.size,
        "backend": dist.backend,
        "device": device_name(device),
        "precision": recipe.train.precision,
        "threads_per_worker": recipe.dist.threads_per_worker if device.type == "cpu" else None,
        "micro_batch_size": plan.micro_batch_size,
        "global_batch_size": plan.global_batch_size,
        "seq_len": plan.max_seq_len,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "step_losses": step_losses,  # mean training loss of every step, warm-up included
        "seconds": elapsed,
        "seq_per_s": seq_per_s,
        "seq_per_s_per_worker": seq_per_s / dist.size,
        "tokens_per_s": total_tokens / elapsed,
        "step_seconds": elapsed / steps,
        **cpu_record(total_cpu_seconds, steps, plan.global_batch_size),
        "breakdown_seconds": breakdown,
        "breakdown_sum_seconds": sum(breakdown.values()),
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "model_flops_per_seq": model_flops_per_seq,
        "model_flops_per_s": model_flops_per_seq * seq_per_s,
        "peak_flops_per_worker": total_peak / dist.size,
        "peak_flops": total_peak,
        "mfu": model_flops_per_seq * seq_per_s / total_peak,
        "parameters": count_parameters(run.model),
        "trainable_parameters": trainable,
        "fp16_allreduce": recipe.dist.fp16_allreduce,
        "cycle_time_ms": recipe.dist.cycle_time_ms,
        "fusion_threshold_mb": recipe.dist.fusion_threshold_mb,
        "allreduce_payload_bytes_per_step": payload,
        "compression": recipe.dist.wire_compression,
        "allreduce_wire_bytes_per_rank_per_step": wire_bytes_per_worker(
            shapes, recipe.dist.wire_compression, dist.size, recipe.dist.powersgd_rank),
        # counted by the hosts' interfaces (0 on one host, where ranks talk over loopback): per rank
        # and timed step, a host's count shared among the ranks it runs
        "wire_tx_bytes_per_rank_per_step": total_wire / dist.size / steps,
        "wire_tx_packets_per_rank_per_step": total_packets / dist.size / steps,  # likewise
        "cache_capacity": recipe.dist.cache_capacity,
        "autotune": recipe.dist.autotune,
    }


def build_measured_run(recipe: Recipe, data_dir, dist: Distributed, compile_flag: bool) -> Run:
    """The run pretrain would build (compiled for --compile as for train.compile), every rank starting
    from rank 0's weights."""
    if compile_flag:
        recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, compile=True))
    run = build_run(recipe, data_dir, dist)
    run.broadcast_from_rank0()
    return run


def find_max_batch(recipe: Recipe, data_dir, dist: Distributed) -> dict:
    """The largest micro-batch for which two training steps fit in GPU memory: double until CUDA
    runs out of memory, then bisect between the last fit and the first failure."""

    def fits(micro: int) -> bool:
        trial = dataclasses.replace(recipe, batch=dataclasses.replace(
            recipe.batch, micro_batch_size=micro, global_batch_size=micro * dist.size))
        run = None
        try:
            run = build_measured_run(trial, data_dir, dist, compile_flag=False)
            run.open_stream()
            guard = StepGuard()
            for _ in range(2):
                run_step(run, guard)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            if run is not None:
                run.close_stream()
            del run
            gc.collect()
            torch.cuda.empty_cache()

    fit, fail, micro = 0, 0, 8
    while micro <= 1 << 16:
        if not fits(micro):
            fail = micro
            break
        fit, micro = micro, micro * 2
    while fail and fail - fit > max(1, fit // 16):
        middle = (fit + fail) // 2
        fit, fail = (middle, fail) if fits(middle) else (fit, middle)
    return {"max_micro_batch_size": fit, "first_failing_micro_batch_size": fail or None,
            "device": device_name(torch.device("cuda")), "precision": recipe.train.precision,
            "seq_len": recipe.data.max_seq_len}
