"""Run under horovodrun by test_core_distributed.py: fp16 training with loss scaling, and a gradient
overflow on ONE rank at one step. Do all ranks skip that step together and stay identical?

Every rank trains the tiny model with train.precision = fp16 (autocast plus torch.amp.GradScaler,
on CPU here) through hvdbert's train_step and StepGuard. At step OVERFLOW_STEP, rank OVERFLOW_RANK
alone multiplies the gradient flowing out of the MLM head by 1e30: the loss stays finite, but the
backward pass overflows float16. After each step every rank writes to OUT_DIR/rank-<r>.json a
fingerprint of its parameters, its GradScaler's scale and its count of skipped steps.
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
from hvdbert.train import StepGuard, train_step


def fingerprint(model: torch.nn.Module) -> list[float]:
    return [float(p.detach().double().sum()) for p in model.parameters()]


def main(recipe_path: str, out_dir: str, steps: int, overflow_step: int, overflow_rank: int) -> None:
    recipe = load_recipe(recipe_path, ["data.builtin_max_documents=1500", "train.precision=fp16",
                                       "model.hidden_dropout_prob=0.0", "model.attention_probs_dropout_prob=0.0"])
    dist = init_distributed(recipe.dist)
    plan = make_plan(recipe, dist.size)
    torch.set_num_threads(1)
    data = open_data(None, recipe, dist)
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, with_nsp=False)
    optimizer = dist.wrap_optimizer(build_optimizer(model, recipe.optim, plan), model,
                                    plan.accumulation_steps, recipe.dist.fp16_allreduce)
    init_state(optimizer, recipe.optim.name)
    dist.broadcast_model_and_optimizer(model, optimizer)

    special = data.manifest.special_token_ids
    rule = MaskingRule(recipe.data.mask_prob, recipe.data.max_predictions_per_seq, special["mask"],
                       data.manifest.vocab_size, (special["pad"], special["cls"], special["sep"]))
    stream = BatchStream(data, StreamLayout(dist.size, dist.rank, plan.micro_batch_size, plan.accumulation_steps),
                         rule, recipe.train.seed, 0, 2)
    precision = Precision.create(recipe.train.precision, torch.device("cpu"))
    assert precision.scaler is not None
    guard = StepGuard()
    overflow = {"now": False}

    def blow_up_gradient(module, inputs, output):
        if overflow["now"]:
            output.register_hook(lambda grad: grad * 1e30)

    model.cls.predictions.transform.register_forward_hook(blow_up_gradient)
    report = {"fingerprints": [fingerprint(model)], "scales": [], "skipped_steps": [], "losses": []}
    for step in range(steps):
        overflow["now"] = step == overflow_step and dist.rank == overflow_rank
        set_lr(optimizer, lr_at(step, plan))
        stats = train_step(PretrainingForward(model), optimizer, stream.next_step(), dist, precision, recipe.train.grad_clip_norm,
                           guard=guard)
        report["fingerprints"].append(fingerprint(model))
        report["scales"].append(precision.scaler.get_scale())
        report["skipped_steps"].append(precision.skipped_steps)
        report["losses"].append(float(stats[0]))
    stream.close()
    report["optimizer_steps"] = sorted({float(s["step"]) for s in optimizer.state.values()})
    Path(out_dir, f"rank-{dist.rank}.json").write_text(json.dumps(report))
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
