"""Run under horovodrun by test_core_distributed.py: do all ranks hold the same parameters?

Each rank builds the tiny model from a DIFFERENT seed, then goes through hvdbert's start-up
(wrap, create optimizer state, broadcast from rank 0) and a few real training steps, and writes
a fingerprint of its parameters after each phase to OUT_DIR/rank-<r>.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hvdbert.config import load_recipe
from hvdbert.data.loader import BatchStream, StreamLayout
from hvdbert.data.masking import MaskingRule
from hvdbert.dist import init_distributed
from hvdbert.model import PretrainingForward, build_model
from hvdbert.optim import build_optimizer, init_state, lr_at, set_lr
from hvdbert.plan import make_plan
from hvdbert.run import open_data
from hvdbert.state import Precision
from hvdbert.train import train_step


def fingerprint(model: torch.nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def main(recipe_path: str, out_dir: str, steps: int) -> None:
    recipe = load_recipe(recipe_path, ["data.builtin_max_documents=1500"])
    dist = init_distributed(recipe.dist)
    plan = make_plan(recipe, dist.size)
    torch.set_num_threads(1)
    data = open_data(None, recipe, dist)
    torch.manual_seed(1000 + dist.rank)  # deliberately different weights on every rank
    model = build_model(recipe.model, with_nsp=False)
    before = fingerprint(model)
    optimizer = dist.wrap_optimizer(build_optimizer(model, recipe.optim, plan), model,
                                    plan.accumulation_steps, recipe.dist.fp16_allreduce)
    init_state(optimizer, recipe.optim.name)
    dist.broadcast_model_and_optimizer(model, optimizer)
    after_broadcast = fingerprint(model)

    special = data.manifest.special_token_ids
    rule = MaskingRule(recipe.data.mask_prob, recipe.data.max_predictions_per_seq, special["mask"],
                       data.manifest.vocab_size, (special["pad"], special["cls"], special["sep"]))
    stream = BatchStream(data, StreamLayout(dist.size, dist.rank, plan.micro_batch_size, plan.accumulation_steps),
                         rule, recipe.train.seed, 0, 2)
    precision = Precision.create("fp32", torch.device("cpu"))
    for step in range(steps):
        set_lr(optimizer, lr_at(step, plan))
        train_step(PretrainingForward(model), optimizer, stream.next_step(), dist, precision, recipe.train.grad_clip_norm)
    stream.close()
    report = {"before": before, "after_broadcast": after_broadcast, "after_steps": fingerprint(model),
              "optimizer_steps": [float(s["step"]) for s in optimizer.state.values()]}
    Path(out_dir, f"rank-{dist.rank}.json").write_text(json.dumps(report))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
