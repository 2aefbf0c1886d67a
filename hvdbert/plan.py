"""Resolve a recipe's batch size, accumulation, learning rate and schedule for a worker count.

    python -m hvdbert.plan --recipe recipes/bert-large-phase1.toml --workers 8 [--json]

Two scaling rules (batch.scaling):
- fixed-global: the global batch and LR stay as written; each worker accumulates
  global / (workers x micro) micro-batches per optimizer step (NVIDIA's practice for BERT).
- per-worker: each worker keeps the reference accumulation, so the global batch grows by
  k = workers / reference_workers. The LR is scaled by k (linear, Goyal et al. 2017) or sqrt(k)
  (You et al. 2019), and max_steps and warmup_steps shrink by k so the run sees the same number of
  samples and warms up over the same number of samples (Goyal et al. warm up over fixed epochs).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass

from hvdbert.config import Recipe, load_recipe
from hvdbert.errors import ArgumentParser, UsageError, cli_entry


@dataclass(frozen=True)
class Plan:
    workers: int
    global_batch_size: int  # sequences per optimizer step, all workers together
    micro_batch_size: int  # sequences per worker per forward/backward pass
    accumulation_steps: int  # micro-batches per worker per optimizer step
    lr: float  # peak learning rate
    warmup_steps: int
    max_steps: int
    max_seq_len: int
    max_predictions_per_seq: int
    scaling: str
    lr_scaling: str
    reference_workers: int
    decay_power: float
    end_lr: float
    # optim.schedule and its wsd tail; a Plan built without them (as before wsd existed) is polynomial
    schedule: str = "polynomial"
    decay_steps: int = 0  # wsd: the decaying tail of max_steps
    decay_shape: str = "linear"  # wsd: optim.decay_shape

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.max_seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _workable_counts(sequences_per_micro_step: int, workers: int) -> str:
    """The worker counts nearest to `workers` that divide the micro-batches of one global step."""
    divisors = [d for d in range(1, sequences_per_micro_step + 1) if sequences_per_micro_step % d == 0]
    below = [d for d in divisors if d < workers]
    above = [d for d in divisors if d > workers]
    near = ([below[-1]] if below else []) + ([above[0]] if above else [])
    return " or ".join(str(d) for d in near)


def make_plan(recipe: Recipe, workers: int) -> Plan:
    batch, optim = recipe.batch, recipe.optim
    if workers < 1:
        raise UsageError(f"worker count {workers} must be at least 1")
    if batch.global_batch_size % batch.micro_batch_size:
        raise UsageError(
            f"{recipe.source}: batch.global_batch_size = {batch.global_batch_size} is not a multiple of "
            f"batch.micro_batch_size = {batch.micro_batch_size}"
        )
    micro_batches = batch.global_batch_size // batch.micro_batch_size  # per step, all workers

    if batch.scaling == "fixed-global":
        if micro_batches % workers:
            raise UsageError(
                f"{workers} workers cannot split batch.global_batch_size = {batch.global_batch_size} into "
                f"micro-batches of {batch.micro_batch_size} ({micro_batches} per step is not divisible by "
                f"{workers}); worker counts that work nearby: {_workable_counts(micro_batches, workers)}"
            )
        return _plan(recipe, workers, batch.global_batch_size, micro_batches // workers, optim.lr,
                     recipe.train.max_steps, _warmup(optim.warmup_proportion, recipe.train.max_steps),
                     _warmup(optim.decay_proportion, recipe.train.max_steps))

    # per-worker: the reference accumulation stays, the global batch grows with the workers
    if micro_batches % batch.reference_workers:
        raise UsageError(
            f"{recipe.source}: batch.global_batch_size = {batch.global_batch_size} is not divisible by "
            f"batch.reference_workers x batch.micro_batch_size = "
            f"{batch.reference_workers} x {batch.micro_batch_size}"
        )
    accumulation = micro_batches // batch.reference_workers
    factor = workers / batch.reference_workers
    lr = optim.lr * {"none": 1.0, "linear": factor, "sqrt": math.sqrt(factor)}[optim.lr_scaling]
    max_steps = max(1, math.ceil(recipe.train.max_steps / factor))
    warmup_steps = math.ceil(_warmup(optim.warmup_proportion, recipe.train.max_steps) / factor)
    decay_steps = min(max_steps - warmup_steps, math.ceil(_warmup(optim.decay_proportion, recipe.train.max_steps) / factor))
    global_batch = accumulation * batch.micro_batch_size * workers
    return _plan(recipe, workers, global_batch, accumulation, lr, max_steps, warmup_steps, max(0, decay_steps))


def _warmup(proportion: float, max_steps: int) -> int:
    return round(proportion * max_steps)


def _plan(recipe: Recipe, workers: int, global_batch: int, accumulation: int, lr: float,
          max_steps: int, warmup_steps: int, decay_steps: int) -> Plan:
    return Plan(
        workers=workers,
        global_batch_size=global_batch,
        micro_batch_size=recipe.batch.micro_batch_size,
        accumulation_steps=accumulation,
        lr=lr,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        max_seq_len=recipe.data.max_seq_len,
        max_predictions_per_seq=recipe.data.max_predictions_per_seq,
        scaling=recipe.batch.scaling,
        lr_scaling=recipe.optim.lr_scaling,
        reference_workers=recipe.batch.reference_workers,
        decay_power=recipe.optim.decay_power,
        end_lr=recipe.optim.end_lr,
        schedule=recipe.optim.schedule,
        decay_steps=decay_steps if recipe.optim.schedule == "wsd" else 0,
        decay_shape=recipe.optim.decay_shape,
    )


def format_plan(plan: Plan) -> str:
    rows = plan.to_dict()
    rows["tokens_per_step"] = plan.tokens_per_step
    width = max(len(k) for k in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows.items())


@cli_entry("hvdbert.plan")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m hvdbert.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe TOML file")
    parser.add_argument("--workers", type=int, required=True, help="number of Horovod workers")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    plan = make_plan(load_recipe(args.recipe, args.set), args.workers)
    print(json.dumps(plan.to_dict()) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
