"""What the step guard costs: training steps with and without it, alternating, in one run.

    horovodrun --gloo -np 2 -H localhost:2 python -m bench.guard_cost --recipe recipes/tiny.toml [--steps 60]

Every rank runs hvdbert's step (train.run_step) on the run pretrain builds; even steps carry a StepGuard
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
    from hvdbert.run import build_run
    from hvdbert.train import StepGuard, run_step

    recipe = load_recipe(args.recipe, args.set)
    dist = init_distributed(recipe.dist)
    run = build_run(recipe, None, dist)
    run.broadcast_from_rank0()
    run.model.train()
    run.open_stream()
    device = run.device

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
            guarded = step % 2 == 0
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = run_step(run, guard if guarded else None)
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_seconds[guarded].append(time.perf_counter() - start - result.data_wait_seconds)
    finally:
        run.close_stream()
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
