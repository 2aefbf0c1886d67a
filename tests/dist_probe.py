"""Run by test_core_distributed.py, as one plain process or under horovodrun: hvdbert's own start-up
and step (build_run, train_step, train) checked from inside the workers, several checks per job so
that the suite pays for one job start instead of one per check.

    python tests/dist_probe.py RECIPE OUT_DIR CHECK...

Checks, each writing what it saw to OUT_DIR (per rank, or as a run directory written by rank 0):
- `broadcast`: every rank builds the tiny model from a DIFFERENT seed, then goes through hvdbert's
  start-up (wrap, create optimizer state, broadcast from rank 0) and 4 real training steps;
  OUT_DIR/broadcast/rank-<r>.json holds a fingerprint of its parameters after each phase.
- `overflow`: fp16 with loss scaling, and a gradient overflow on rank 1 alone at step 2 (the gradient
  out of the MLM head times 1e30: the loss stays finite, the backward overflows float16). After each
  step every rank writes a fingerprint, its GradScaler's scale and its count of skipped steps to
  OUT_DIR/overflow/rank-<r>.json.
- `waiting`: rank 1 comes LATE_SECONDS late to a step's gradient allreduce and to a plain
  allreduce; rank 0 writes the wall time and its own thread's CPU time of each wait to
  OUT_DIR/waiting/rank-0.json (dist.poll_interval_ms: a wait that sleeps, not one that spins).
- any name of CONFIGS: an 8-step (compiled and half precision: 4-step) run of the tiny recipe without dropout, as
  `train()` runs it, its metrics in OUT_DIR/<name>/metrics.jsonl (rank 0 writes them).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from hvdbert.config import load_recipe
from hvdbert.data.loader import BatchStream, StreamLayout
from hvdbert.data.masking import MaskingRule
from hvdbert.dist import Distributed, init_distributed
from hvdbert.metrics import NullMetrics, RunMetrics
from hvdbert.model import PretrainingForward, build_model
from hvdbert.optim import build_optimizer, init_state, lr_at, set_lr
from hvdbert.plan import make_plan
from hvdbert.run import build_run, open_data
from hvdbert.state import Precision
from hvdbert.train import StepGuard, train, train_step

SMALL = ["data.builtin_max_documents=1500", "train.progress_bar=false"]
EXACT = SMALL + ["model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0", "train.log_every=1",
                 "train.max_steps=8"]
FP16_WIRE = ["dist.fp16_allreduce=true"]
# Half-precision autocast is emulated, 5-7 times as slow as fp32, on CPUs without AVX-512: 4 steps
HALF_STEPS = 4
BF16, FP16 = (["train.precision=" + name, f"train.max_steps={HALF_STEPS}"] for name in ("bf16", "fp16"))
# Configurations of the tiny recipe: the names the test reads, the overrides that make them.
CONFIGS = {
    "fp32": [],
    "fp32-fp16-allreduce": FP16_WIRE,
    "bf16": BF16,
    "bf16-fp16-allreduce": [*BF16, *FP16_WIRE],
    "fp16": FP16,
    "fp16-fp16-allreduce": [*FP16, *FP16_WIRE],
    "compiled": ["train.compile=true", "train.max_steps=4"],  # the encoder and head under torch.compile
    # hvdbert's own compression (hvdbert/compression.py): bf16 on the wire, and PowerSGD under AdamW
    "bf16-wire": ["dist.compression=bf16"],
    "powersgd-adamw": ["dist.compression=powersgd", "optim.name=adamw", "optim.lr=2e-3"],
    # hvdbert's gradient buckets (dist.bucket_mb) instead of Horovod's per-tensor hooks: 0.25 MB makes
    # several buckets of the tiny model's 3.9 MB; micro-batches of 8 make two local passes per step
    "bucketed": ["dist.bucket_mb=0.25", "batch.micro_batch_size=8"],
    "bucketed-fp16-allreduce": ["dist.bucket_mb=0.25", *FP16_WIRE],
}
OVERFLOW_STEPS, OVERFLOW_STEP, OVERFLOW_RANK = 4, 2, 1
LATE_SECONDS = 1.0


def fingerprint(model: torch.nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def tiny_training(recipe_path: str, overrides: list[str], dist: Distributed, seed: int | None = None):
    """The tiny model (from `seed`, default the recipe's), its optimizer broadcast from rank 0, and
    this rank's stream."""
    recipe = load_recipe(recipe_path, overrides)
    plan = make_plan(recipe, dist.size)
    torch.set_num_threads(1)
    data = open_data(None, recipe, dist)
    torch.manual_seed(recipe.train.seed if seed is None else seed)
    model = build_model(recipe.model, with_nsp=False)
    before = fingerprint(model)
    optimizer = dist.wrap_optimizer(build_optimizer(model, recipe.optim, plan), model,
                                    plan.accumulation_steps, recipe.dist.fp16_allreduce, bucket_mb=recipe.dist.bucket_mb)
    init_state(optimizer, recipe.optim.name)
    dist.broadcast_model_and_optimizer(model, optimizer)
    special = data.manifest.special_token_ids
    rule = MaskingRule(recipe.data.mask_prob, recipe.data.max_predictions_per_seq, special["mask"],
                       data.manifest.vocab_size, (special["pad"], special["cls"], special["sep"]))
    stream = BatchStream(data, StreamLayout(dist.size, dist.rank, plan.micro_batch_size, plan.accumulation_steps),
                         rule, recipe.train.seed, 0, 2)
    return recipe, plan, model, optimizer, stream, before


def check_broadcast(recipe_path: str, out: Path, dist: Distributed) -> None:
    recipe, plan, model, optimizer, stream, before = tiny_training(recipe_path, SMALL, dist, 1000 + dist.rank)
    after_broadcast = fingerprint(model)
    precision = Precision.create("fp32", torch.device("cpu"))
    for step in range(4):
        set_lr(optimizer, lr_at(step, plan))
        train_step(PretrainingForward(model), optimizer, stream.next_step(), dist, precision, recipe.train.grad_clip_norm)
    stream.close()
    report = {"before": before, "after_broadcast": after_broadcast, "after_steps": fingerprint(model),
              "optimizer_steps": [float(s["step"]) for s in optimizer.state.values()]}
    (out / f"rank-{dist.rank}.json").write_text(json.dumps(report))


def check_overflow(recipe_path: str, out: Path, dist: Distributed) -> None:
    recipe, plan, model, optimizer, stream, _ = tiny_training(recipe_path, EXACT + CONFIGS["fp16"], dist)
    precision = Precision.create(recipe.train.precision, torch.device("cpu"))
    assert precision.scaler is not None
    guard = StepGuard()
    overflow = {"now": False}

    def blow_up_gradient(module, inputs, output):
        if overflow["now"]:
            output.register_hook(lambda grad: grad * 1e30)

    model.cls.predictions.transform.register_forward_hook(blow_up_gradient)
    report = {"steps": OVERFLOW_STEPS, "overflow_step": OVERFLOW_STEP, "fingerprints": [fingerprint(model)],
              "scales": [], "skipped_steps": [], "losses": []}
    for step in range(OVERFLOW_STEPS):
        overflow["now"] = step == OVERFLOW_STEP and dist.rank == OVERFLOW_RANK
        set_lr(optimizer, lr_at(step, plan))
        stats = train_step(PretrainingForward(model), optimizer, stream.next_step(), dist, precision,
                           recipe.train.grad_clip_norm, guard=guard)
        report["fingerprints"].append(fingerprint(model))
        report["scales"].append(precision.scaler.get_scale())
        report["skipped_steps"].append(precision.skipped_steps)
        report["losses"].append(float(stats[0]))
    stream.close()
    report["optimizer_steps"] = sorted({float(s["step"]) for s in optimizer.state.values()})
    (out / f"rank-{dist.rank}.json").write_text(json.dumps(report))


def check_waiting(recipe_path: str, out: Path, dist: Distributed) -> None:
    recipe, plan, model, optimizer, stream, _ = tiny_training(recipe_path, SMALL, dist)
    waits = {}

    def timed(name: str, wait, *args):
        wall, cpu = time.perf_counter(), time.thread_time()
        wait(*args)
        waits[name] = {"wall_seconds": time.perf_counter() - wall, "cpu_seconds": time.thread_time() - cpu}

    forward = PretrainingForward(model)

    def late_forward(batch):
        if dist.rank == 1:
            time.sleep(LATE_SECONDS)
        return forward(batch)

    synchronize = dist.synchronize
    dist.synchronize = lambda optimizer: timed("gradients", synchronize, optimizer)
    try:
        train_step(late_forward, optimizer, stream.next_step(), dist, Precision.create("fp32", torch.device("cpu")),
                   recipe.train.grad_clip_norm)
    finally:
        del dist.synchronize
    stream.close()
    if dist.rank == 1:
        time.sleep(LATE_SECONDS)
    timed("allreduce", dist.allreduce_sum, torch.ones(4), "late")
    (out / f"rank-{dist.rank}.json").write_text(json.dumps(waits))


def train_config(recipe_path: str, out: Path, dist: Distributed, name: str) -> None:
    """The run pretrain would make of the tiny recipe with CONFIGS[name], from a random start."""
    run = build_run(load_recipe(recipe_path, EXACT + CONFIGS[name]), None, dist)
    run.broadcast_from_rank0()
    run.open_stream()
    metrics = RunMetrics(out, 0, run.plan.max_steps, False) if dist.rank == 0 else NullMetrics()
    try:
        train(run, metrics)
    finally:
        run.close_stream()
        metrics.close()


def main(recipe_path: str, out_dir: str, checks: list[str]) -> None:
    dist = init_distributed(load_recipe(recipe_path).dist)
    for check in checks:
        out = Path(out_dir, check)
        out.mkdir(parents=True, exist_ok=True)
        if check == "broadcast":
            check_broadcast(recipe_path, out, dist)
        elif check == "overflow":
            check_overflow(recipe_path, out, dist)
        elif check == "waiting":
            check_waiting(recipe_path, out, dist)
        else:
            train_config(recipe_path, out, dist, check)
        dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
