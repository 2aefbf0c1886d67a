"""Building the optimizer a recipe names (the table is optimizers.OPTIMIZERS) and the learning-rate
schedules (linear warmup, then polynomial decay or warmup-stable-decay)."""
from __future__ import annotations

import math

import torch

from hvdbert.config import OptimConfig
from hvdbert.optimizers import OPTIMIZERS
from hvdbert.plan import Plan


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Biases and LayerNorm parameters (the 1-D tensors) get no weight decay and no trust ratio."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay, "trust_ratio": True},
        {"params": no_decay, "weight_decay": 0.0, "trust_ratio": False},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, plan: Plan) -> torch.optim.Optimizer:
    """optim.name's optimizer (optimizers.OPTIMIZERS) over `model`'s parameter groups at the plan's peak rate."""
    on_cuda = next(model.parameters()).is_cuda
    return OPTIMIZERS[cfg.name].build(parameter_groups(model, cfg.weight_decay), cfg, plan.lr, on_cuda)


def init_state(optimizer: torch.optim.Optimizer, name: str) -> None:
    """Create the state of `optimizer` (optim.name `name`) now rather than at its first step, so that
    every rank holds state before Horovod broadcasts it (Horovod would otherwise create it with a
    zero-gradient step, advancing Adam's step count and applying weight decay once)."""
    OPTIMIZERS[name].init_state(optimizer)


def lr_at(step: int, plan: Plan) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then polynomial decay, or
    (wsd) the peak until the last plan.decay_steps, which decay linearly or as 1 - sqrt."""
    if step < plan.warmup_steps:
        return plan.lr * (step + 1) / plan.warmup_steps
    if plan.schedule == "wsd":
        decay_start = plan.max_steps - plan.decay_steps
        if step < decay_start:
            return plan.lr
        done = min(1.0, (step + 1 - decay_start) / plan.decay_steps)
        remaining = 1.0 - (math.sqrt(done) if plan.decay_shape == "1-sqrt" else done)
        return plan.end_lr + (plan.lr - plan.end_lr) * remaining
    decay_steps = max(1, plan.max_steps - plan.warmup_steps)
    remaining = max(0.0, 1.0 - (step - plan.warmup_steps) / decay_steps)
    return plan.end_lr + (plan.lr - plan.end_lr) * remaining**plan.decay_power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
