"""LAMB (You et al. 2019), the optimizer BERT's large-batch recipes train with; torch has none."""
from __future__ import annotations

import math

import torch


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
