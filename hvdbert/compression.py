"""Gradient compression that hvdbert does itself (dist.compression = bf16 | powersgd), and the
bytes each option puts on the wire (`compressed_bytes`, `wire_bytes_per_worker`).

`none` and `fp16` are Horovod's own (hvd.Compression, inside its DistributedOptimizer). The two here
reduce all of a step's gradients at once, after the last backward pass, through the collectives the
distributed layer hands them (`Collectives`: Horovod's, or identities on one process), so this module
needs no Horovod. They give up what Horovod's per-tensor hooks give: overlap of the reduction with
the backward pass (docs/compression.md). Gradient accumulation needs nothing of them: the local
passes sum into `.grad`, and the step reduces once.

- `bf16`: the gradients rounded to bfloat16. Horovod 0.28.1's torch allreduce refuses bfloat16
  tensors (ValueError: Tensor type torch.BFloat16Tensor is not supported), so each worker allgathers
  the bits (as int16) and sums every worker's copy in float32 itself.
- `powersgd`: PowerSGD (Vogels et al. 2019), rank-r factors of each weight matrix with error feedback
  and warm start, as torch's DDP powerSGD_hook; vectors (biases, LayerNorm) and matrices that a rank-r
  pair would not shrink go uncompressed, in one float32 allreduce.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

FLOAT32_BYTES, HALF_BYTES = 4, 2


@dataclass
class Collectives:
    """What a compressor asks of the distributed layer. `allreduce_mean(t, name)` returns the mean of
    `t` over the workers; `allgather(t, name)` the workers' `t` (shape (1, n)) stacked as (workers, n)."""

    allreduce_mean: Callable[[torch.Tensor, str], torch.Tensor]
    allgather: Callable[[torch.Tensor, str], torch.Tensor]


SINGLE_PROCESS = Collectives(allreduce_mean=lambda tensor, name: tensor, allgather=lambda tensor, name: tensor)


def grads_or_zeros(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    for p in params:
        if p.grad is None:  # a parameter this step did not reach: it contributes zeros, as in Horovod
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]


def _flat_reduce(grads: list[torch.Tensor], collectives: Collectives, name: str) -> None:
    """One float32 allreduce of all of `grads`, written back in place."""
    if not grads:
        return
    copy_flat_into(collectives.allreduce_mean(torch.cat([g.reshape(-1) for g in grads]), name), grads)


def copy_flat_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive slices of `flat` into `tensors` (casting to their dtype), in order."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


class Bf16Wire:
    """bfloat16 on the wire: float32's range with 8 bits of mantissa, so no loss scaling is needed
    (fp16's 5-bit exponent underflows small gradients without it)."""

    name = "bf16"
    stateful = False  # nothing carries over from step to step

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]

    def reduce(self, collectives: Collectives) -> None:
        grads = grads_or_zeros(self.params)
        flat = torch.cat([g.reshape(-1) for g in grads]).to(torch.bfloat16)
        # Horovod: no bfloat16 allreduce, so every worker's bits travel (as int16) and each sums them.
        gathered = collectives.allgather(flat.view(torch.int16).unsqueeze(0), "bf16_gradients")
        copy_flat_into(gathered.view(torch.bfloat16).float().mean(dim=0), grads)


def low_rank(shape: torch.Size, rank: int) -> int | None:
    """The rank PowerSGD uses for a parameter of `shape` (a matrix viewed as shape[0] x the rest),
    or None when it is sent whole: a vector, or a matrix its two factors would not shrink."""
    if len(shape) < 2:
        return None
    rows, cols = shape[0], math.prod(shape[1:])
    r = min(rank, rows, cols)
    return r if r * (rows + cols) < rows * cols else None


class PowerSGD:
    """Rank-r PowerSGD with error feedback and warm start (Vogels et al. 2019, Algorithm 1).

    Per step and weight matrix, on each worker: M = gradient + error; P = M Q; P is averaged over the
    workers and orthonormalised; Q = M^T P, averaged; the gradient becomes P Q^T and the error M - P Q^T.
    Q is kept for the next step (warm start: one power-iteration step per training step). All P of a
    step travel in one allreduce, all Q in another, the uncompressed tensors in a third.

    Every step is linear in M given the averaged factors, so the workers' average follows exactly the
    recursion one worker would run on the averaged gradient: a run on N workers equals the run on one
    (with accumulation) up to float rounding, and only the workers' MEAN error matters for what
    follows, which is what a resume on another worker count carries over (`load_state`)."""

    name = "powersgd"
    stateful = True  # checkpoints carry it (Checkpointer gathers every worker's state_dict)

    def __init__(self, params: Iterable[torch.nn.Parameter], rank: int, start_step: int, seed: int):
        self.rank = rank
        self.start_step = start_step  # optimizer steps of plain float32 allreduce first
        self.seed = seed
        self.params = [p for p in params if p.requires_grad]
        self.matrices = [p for p in self.params if low_rank(p.shape, rank) is not None]
        matrix_ids = {id(p) for p in self.matrices}
        self.vectors = [p for p in self.params if id(p) not in matrix_ids]
        self.steps = 0  # reductions done (the optimizer steps, skipped ones included)
        self.restored: tuple[bool, dict | None] = (False, None)  # rank 0: what a checkpoint held
        self.reset()

    def reset(self) -> None:
        """Zero errors and fresh factors, the same on every worker (drawn from `seed`)."""
        generator = torch.Generator().manual_seed(self.seed)
        self.q = [torch.randn(p[0].numel(), low_rank(p.shape, self.rank), generator=generator).to(p.device)
                  for p in self.matrices]
        self.errors = [torch.zeros(p.shape[0], p[0].numel(), device=p.device) for p in self.matrices]

    def reduce(self, collectives: Collectives) -> None:
        """Average the gradients over the workers, compressed (after start_step plain), in place."""
        if self.steps < self.start_step:
            _flat_reduce(grads_or_zeros(self.params), collectives, "gradients")
            self.steps += 1
            return
        _flat_reduce(grads_or_zeros(self.vectors), collectives, "powersgd_uncompressed")
        grads = grads_or_zeros(self.matrices)
        ms = [g.reshape(g.shape[0], -1) + e for g, e in zip(grads, self.errors)]
        ps = self._mean([m @ q for m, q in zip(ms, self.q)], collectives, "powersgd_p")
        ps = [torch.linalg.qr(p).Q for p in ps]  # the same on every worker: they hold the same P
        qs = self._mean([m.T @ p for m, p in zip(ms, ps)], collectives, "powersgd_q")
        approximations = [p @ q.T for p, q in zip(ps, qs)]
        # A non-finite gradient on any worker reaches every worker's factors through the averages:
        # keep the previous errors and factors then (the step guard skips the update), or they would
        # poison every later step. One host sync per step, on tensors already reduced.
        if bool(torch.isfinite(torch.cat([t.reshape(-1) for t in ps + qs])).all()):
            self.errors = [m - a for m, a in zip(ms, approximations)]
            self.q = qs
        for g, a in zip(grads, approximations):
            g.copy_(a.view_as(g))
        self.steps += 1

    @staticmethod
    def _mean(tensors: list[torch.Tensor], collectives: Collectives, name: str) -> list[torch.Tensor]:
        flat = collectives.allreduce_mean(torch.cat([t.reshape(-1) for t in tensors]), name)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return out

    # Checkpoints: errors differ per worker; factors and the step count are the same on all.
    def state_dict(self) -> dict:
        """This worker's part (the caller gathers every worker's, in rank order)."""
        return {"name": self.name, "rank": self.rank, "steps": self.steps, "q": [q.cpu() for q in self.q],
                "errors": torch.cat([e.reshape(-1) for e in self.errors]).cpu() if self.errors else torch.zeros(0)}

    @staticmethod
    def combine(parts: list[dict]) -> dict:
        """Every worker's state_dict (rank order) as the checkpoint holds it: the shared part once,
        the errors per worker."""
        return {**{k: v for k, v in parts[0].items() if k != "errors"}, "errors": [p["errors"] for p in parts]}

    def load_state(self, saved: dict | None, rank: int, size: int) -> str | None:
        """Take this worker's state from a checkpoint's (`combine`d) state; returns a line to log
        when it is not the state the saving workers held."""
        self.reset()
        if saved is None or saved.get("name") != self.name or saved.get("rank") != self.rank \
                or [tuple(q.shape) for q in saved["q"]] != [tuple(q.shape) for q in self.q]:
            self.steps = 0 if saved is None else int(saved.get("steps", 0))
            return ("the checkpoint holds no PowerSGD state of this rank (dist.powersgd_rank) and model: "
                    "errors start at zero and factors afresh")
        self.steps = int(saved["steps"])
        self.q = [q.to(p.device) for q, p in zip(saved["q"], self.matrices)]
        errors = saved["errors"]
        own = errors[rank] if len(errors) == size else torch.stack(errors).mean(dim=0)
        offset = 0
        for index, e in enumerate(self.errors):
            self.errors[index] = own[offset:offset + e.numel()].view_as(e).to(e.device).clone()
            offset += e.numel()
        if len(errors) != size:
            return (f"PowerSGD state saved by {len(errors)} workers, resumed on {size}: every worker starts "
                    "from their mean error, which is all the run's course depends on (docs/compression.md)")
        return None


def build_compressor(compression: str, params: Iterable[torch.nn.Parameter], powersgd_rank: int,
                     powersgd_start_step: int, seed: int) -> Bf16Wire | PowerSGD | None:
    """The compressor hvdbert runs for `compression` (DistConfig.wire_compression), or None when
    Horovod's DistributedOptimizer reduces (none, fp16)."""
    if compression == "bf16":
        return Bf16Wire(params)
    if compression == "powersgd":
        return PowerSGD(params, powersgd_rank, powersgd_start_step, seed)
    return None


def compressed_bytes(shapes: Iterable[torch.Size], compression: str, powersgd_rank: int) -> int:
    """Bytes each worker submits per optimizer step for trainable parameters of `shapes` (after
    powersgd's start_step; `powersgd_rank` is read for powersgd only): what a ring allreduce moves 2 (N-1)/N times per worker, or, for bf16
    (an allgather), N-1 times (`wire_bytes_per_worker`)."""
    shapes = [torch.Size(s) for s in shapes]
    if compression == "none":
        return FLOAT32_BYTES * sum(s.numel() for s in shapes)
    if compression in ("fp16", "bf16"):
        return HALF_BYTES * sum(s.numel() for s in shapes)
    if compression == "powersgd":
        total = 0
        for s in shapes:
            r = low_rank(s, powersgd_rank)
            total += FLOAT32_BYTES * (s.numel() if r is None else r * (s[0] + s.numel() // s[0]))
        return total
    raise ValueError(f"unknown compression {compression!r}")


def wire_bytes_per_worker(shapes: Iterable[torch.Size], compression: str, workers: int,
                          powersgd_rank: int) -> float:
    """Bytes each worker sends per optimizer step over a ring: an allreduce sends 2 (N-1)/N of its
    payload, an allgather (bf16) N-1 times it; 0 on one worker."""
    payload = compressed_bytes(shapes, compression, powersgd_rank)
    if workers <= 1:
        return 0.0
    if compression == "bf16":
        return float(payload * (workers - 1))
    return payload * 2.0 * (workers - 1) / workers
