"""What the step guard costs: training steps with and without it, alternating, in one run.

    horovodrun --gloo -np 2 -H localhost:2 python -m bench.guard_cost --recipe recipes/tiny.toml [--steps 60]

Every rank runs hvdbert's train_step on the recipe's model and data; even steps carry a StepGuard
(train() always does), odd steps none, so both see the same machine load. Reported by rank 0, as
medians over the steps (the first two of each kind are warm-up): the step time with and without the
guard, and within the guarded steps the guard's read, `StepGuard.collect` (waiting for the flags'
allreduce, then `.tolist()`, the host sync).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()

    from hvdbert.config import load_recipe
    from hvdbert.dist import init_distributed
    from hvdbert.model import build_model
    from hvdbert.optim import build_optimizer, init_state, lr_at, set_lr
    from hvdbert.plan import make_plan
    from hvdbert.pretrain import choose_device, open_data, open_stream
    from hvdbert.train import Precision, StepGuard, dropout_seeds, train_step

    recipe = load_recipe(args.recipe, args.set)
    dist = init_distributed(recipe.dist)
    plan = make_plan(recipe, dist.size)
    device = choose_device(dist, recipe.train.precision)
    torch.set_num_threads(recipe.dist.threads_per_worker)
    data = open_data(None, recipe, dist)
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, with_nsp=data.has_nsp).to(device).train()
    optimizer = dist.wrap_optimizer(build_optimizer(model, recipe.optim, plan), model,
                                    plan.accumulation_steps, recipe.dist.fp16_allreduce)
    init_state(optimizer)
    dist.broadcast_model_and_optimizer(model, optimizer)
    precision = Precision.create(recipe.train.precision, device)
    stream = open_stream(data, recipe, plan, dist, 0, device)

    guard = StepGuard()
    collect = guard.collect
    collect_seconds: list[float] = []

    def timed_collect(dist_):
        start = time.perf_counter()
        skip = collect(dist_)
        collect_seconds.append(time.perf_counter() - start)
        return skip

    guard.collect = timed_collect
    step_seconds: dict[bool, list[float]] = {True: [], False: []}
    try:
        for step in range(args.steps):
            micro_batches = stream.next_step()
            set_lr(optimizer, lr_at(step, plan))
            seeds = dropout_seeds(recipe.train.seed, stream.layout, step * plan.global_batch_size)
            guarded = step % 2 == 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            train_step(model, optimizer, micro_batches, dist, precision, recipe.train.grad_clip_norm, seeds,
                       guard if guarded else None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_seconds[guarded].append(time.perf_counter() - start)
    finally:
        stream.close()
    if dist.rank == 0:
        with_guard, without = (statistics.median(step_seconds[k][2:]) for k in (True, False))
        reads = statistics.median(collect_seconds[2:])
        print(json.dumps({
            "workers": dist.size, "device": device.type, "precision": recipe.train.precision,
            "steps_each": len(step_seconds[True]) - 2,
            "step_ms_with_guard": round(with_guard * 1e3, 2), "step_ms_without_guard": round(without * 1e3, 2),
            "collect_ms": round(reads * 1e3, 3), "collect_fraction_of_step": round(reads / with_guard, 5),
        }))
    dist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
