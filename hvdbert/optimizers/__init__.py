"""The optimizer table: each `optim.name` and how to build it, how to create its state before the
first step, and which LR-scaling rule `optim.lr_scaling = auto` means for it.

Adding an optimizer is one entry in OPTIMIZERS (plus a module of its own in this package when
neither torch nor an installed package has it, as optimizers/lamb.py for LAMB): config.py takes
optim.name's choices from this table, optim.py builds and initialises through it, plan.py resolves
`auto` through it. The table sits low in the layers so that config.py can read it; nothing here
imports torch until an optimizer is built.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

    from hvdbert.config import OptimConfig


@dataclass(frozen=True)
class OptimizerEntry:
    # (parameter groups from optim.parameter_groups, the [optim] section, peak lr, on CUDA) -> optimizer.
    # The groups carry LAMB's `trust_ratio` flag; other optimizers drop it (_without_trust_ratio).
    build: Callable[[list[dict], OptimConfig, float, bool], Any]
    # Creates the state the optimizer would create lazily at its first step (optim.init_state says why).
    init_state: Callable[[Any], None]
    # What optim.lr_scaling = auto resolves to: sqrt (You et al. 2019, LAMB) or linear (Goyal et al. 2017).
    lr_scaling: str


def _without_trust_ratio(groups: list[dict]) -> list[dict]:
    for group in groups:
        group.pop("trust_ratio")
    return groups


def _build_lamb(groups: list[dict], cfg: OptimConfig, lr: float, on_cuda: bool):
    from hvdbert.optimizers.lamb import Lamb

    return Lamb(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _init_lamb_state(optimizer) -> None:
    optimizer.init_state()


def _build_adamw(groups: list[dict], cfg: OptimConfig, lr: float, on_cuda: bool):
    import torch

    # fused on CPU too (torch's fused AdamW kernel; the Trainer's default, adamw_torch_fused): BERT-mini's
    # update in 4 ms of CPU against foreach's 14 (docs/quality.md, the step's levers)
    return torch.optim.AdamW(_without_trust_ratio(groups), lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True)


def _init_adamw_state(optimizer: torch.optim.AdamW) -> None:
    import torch

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
            # optimi 0.3 deprecates foreach in favour of triton, which CPUs lack, and warns at every
            # construction (Horovod's wrapper constructs it again); without foreach, optimi loops over
            # the tensors one by one, so foreach stays and that one warning is silenced.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Parameter `foreach` is deprecated",
                                        category=DeprecationWarning)
                super().__init__(params, lr=lr, **kwargs)

    return StableAdamW


def _build_stable_adamw(groups: list[dict], cfg: OptimConfig, lr: float, on_cuda: bool):
    # decouple_lr: the weight decay follows the schedule (lr / peak lr) but not the lr's size,
    # as ModernBERT's decoupled_stableadamw (AnswerDotAI/ModernBERT main.py); its 1e-5 assumes it.
    # triton=False: optimi's foreach path on CPU and GPU alike (triton is optional there).
    return _stable_adamw_class()(_without_trust_ratio(groups), lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 weight_decay=cfg.weight_decay, decouple_lr=True, max_lr=lr, foreach=True,
                                 triton=False)


def _init_stable_adamw_state(optimizer) -> None:
    import torch

    # What optimi's StableAdamW._init_group does at its first step: the group's step counter (optimi
    # keeps it per group) and each parameter's moments.
    for group in optimizer.param_groups:
        if not group["setup"]:
            group["setup"] = True
            group["step"] = torch.tensor(0, dtype=torch.int32)
        for p in group["params"]:
            optimizer._init_state(group, optimizer.state[p], p)


# optim.name -> its entry; the order is the one error messages list the choices in.
OPTIMIZERS = {
    "lamb": OptimizerEntry(_build_lamb, _init_lamb_state, lr_scaling="sqrt"),
    "adamw": OptimizerEntry(_build_adamw, _init_adamw_state, lr_scaling="linear"),
    # torch-optimi's StableAdamW with lr-decoupled weight decay, as ModernBERT trains
    # (AnswerDotAI/ModernBERT main.py, optimizer name decoupled_stableadamw)
    "stableadamw": OptimizerEntry(_build_stable_adamw, _init_stable_adamw_state, lr_scaling="linear"),
}
