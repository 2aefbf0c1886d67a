"""FLOPs of a training pass and the peak they are measured against (MFU), timing and memory helpers."""
from __future__ import annotations

import os
import platform
import resource
import time

import torch

from hvdbert import families
from hvdbert.families.bert import SHAPES  # noqa: F401 - the benchmark's named shapes, BertConfig fields


def training_flops_per_sequence(model_fields: dict, seq_len: int, head_positions: int) -> float:
    """Model FLOPs of one training pass (forward + backward) over one sequence, by the family's own
    count (families/<family>.py: training_flops_per_sequence). The MLM head is counted at
    `head_positions` positions per sequence: all S for a full head (HF's BertForMaskedLM), the
    max_predictions_per_seq gathered slots for hvdbert's gather-first head, the work it really does."""
    return families.family_of(model_fields).hooks.training_flops_per_sequence(model_fields, seq_len, head_positions)


def probe_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best FLOP/s of square matrix multiplies on `device`: the denominator of MFU.

    n = 1024 on CPU (one matmul takes tens of ms on one thread), 8192 on CUDA (large enough for the
    tensor cores to reach their sustained rate)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2.0 * n**3
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.matmul(a, b)  # warm-up: kernel selection, page faults
    while True:
        repeats = 10 if device.type == "cuda" else 1
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
        best = max(best, repeats * flops / elapsed)
        if time.perf_counter() > deadline:
            return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a host sync, only at timing boundaries


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def cpu_record(cpu_seconds: float, steps: int, sequences_per_step: int) -> dict:
    """The CPU time of the timed steps, summed over the measured processes (time.process_time: every
    thread of each, so intra-op threads, Horovod's background thread and data loading count): on a
    shared machine a load peak stretches wall time but not the CPU a step needs, so ratios between
    systems are taken from these."""
    return {"cpu_seconds": cpu_seconds, "cpu_seconds_per_step": cpu_seconds / steps,
            "cpu_seconds_per_sequence": cpu_seconds / (steps * sequences_per_step)}
