"""Optimizers (LAMB, AdamW, StableAdamW) and the learning-rate schedules (linear warmup, then
polynomial decay or warmup-stable-decay)."""
from __future__ import annotations

import math

import torch

from hvdbert.config import OptimConfig
from hvdbert.plan import Plan


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning").

    Adam moments with bias correction; the update u = m_hat / (sqrt(v_hat) + eps) + wd * w is
    scaled per tensor by the trust ratio ||w|| / ||u|| (1 where either norm is 0). Groups with
    `trust_ratio=False` (biases and LayerNorm, with weight_decay 0) take the plain Adam update.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 trust_ratio: bool = True):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_ratio=trust_ratio)
        super().__init__(params, defaults)

    def init_state(self) -> None:
        """Create the moments (and step count) before the first step; see optim.init_state."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.init_state()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]
            exp_avgs = [s["exp_avg"] for s in states]
            exp_avg_sqs = [s["exp_avg_sq"] for s in states]
            for s in states:
                s["step"] += 1
            step = states[0]["step"].item()  # a CPU tensor: no device sync

            torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m = b1 m + (1 - b1) g
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            denominators = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_div_(denominators, math.sqrt(bias_correction2))
            torch._foreach_add_(denominators, group["eps"])
            updates = torch._foreach_div(exp_avgs, denominators)
            torch._foreach_div_(updates, bias_correction1)
            if group["weight_decay"]:
                torch._foreach_add_(updates, params, alpha=group["weight_decay"])

            if group["trust_ratio"]:
                weight_norms = torch.stack(torch._foreach_norm(params))
                update_norms = torch.stack(torch._foreach_norm(updates))
                ratios = torch.where(
                    (weight_norms > 0) & (update_norms > 0),
                    weight_norms / update_norms,
                    torch.ones_like(weight_norms),
                )
                torch._foreach_mul_(updates, list(ratios.unbind(0)))
            torch._foreach_add_(params, updates, alpha=-group["lr"])
        return loss


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


def _init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    # The same tensors AdamW creates lazily on its first step (torch/optim/adamw.py _init_group).
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _stable_adamw_class():
    import optimi

    class StableAdamW(optimi.StableAdamW):
        """torch-optimi's StableAdamW (Wortsman et al. 2023: AdamW with AdaFactor's update clipping).
        The lr default exists only because Horovod's DistributedOptimizer re-creates the optimizer
        class from its param groups (which carry the lr) with no lr argument."""

        def __init__(self, params, lr: float = 1e-3, **kwargs):
            super().__init__(params, lr=lr, **kwargs)

    return StableAdamW


def _init_stable_adamw_state(optimizer) -> None:
    # What optimi's StableAdamW._init_group does at its first step: the group's step counter (optimi
    # keeps it per group) and each parameter's moments.
    for group in optimizer.param_groups:
        if not group["setup"]:
            group["setup"] = True
            group["step"] = torch.tensor(0, dtype=torch.int32)
        for p in group["params"]:
            optimizer._init_state(group, optimizer.state[p], p)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, plan: Plan) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.name == "lamb":
        return Lamb(groups, lr=plan.lr, betas=betas, eps=cfg.eps)
    on_cuda = next(model.parameters()).is_cuda
    for group in groups:
        group.pop("trust_ratio")
    if cfg.name == "stableadamw":
        # decouple_lr: the weight decay follows the schedule (lr / peak lr) but not the lr's size,
        # as ModernBERT's decoupled_stableadamw (AnswerDotAI/ModernBERT main.py); its 1e-5 assumes it.
        # triton=False: optimi's foreach path on CPU and GPU alike (triton is optional there).
        return _stable_adamw_class()(groups, lr=plan.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
                                     decouple_lr=True, max_lr=plan.lr, foreach=True, triton=False)
    return torch.optim.AdamW(groups, lr=plan.lr, betas=betas, eps=cfg.eps,
                             fused=on_cuda, foreach=None if on_cuda else True)


def init_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's state now rather than at its first step, so that every rank holds
    state before Horovod broadcasts it (Horovod would otherwise create it with a zero-gradient step,
    advancing Adam's step count and applying weight decay once)."""
    if isinstance(optimizer, Lamb):
        optimizer.init_state()
    elif "setup" in optimizer.defaults:  # optimi's optimizers
        _init_stable_adamw_state(optimizer)
    else:
        _init_adamw_state(optimizer)


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
