"""LAMB against the formula computed by hand, parameter groups, and the LR schedule."""
from __future__ import annotations

import math

import pytest
import torch

from hvdbert.config import OptimConfig
from hvdbert.optimizers.lamb import Lamb
from hvdbert.optim import build_optimizer, init_state, lr_at, parameter_groups
from hvdbert.plan import Plan


def test_one_lamb_step_matches_the_formula():
    w0 = [[0.5, -1.0], [2.0, 0.25]]
    g = [[0.1, -0.2], [0.3, 0.4]]
    weight = torch.nn.Parameter(torch.tensor(w0, dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor([0.3, -0.6], dtype=torch.float64))
    weight.grad = torch.tensor(g, dtype=torch.float64)
    bias.grad = torch.tensor([0.5, -0.5], dtype=torch.float64)
    lr, b1, b2, eps, wd = 0.01, 0.9, 0.999, 1e-6, 0.01
    optimizer = Lamb([{"params": [weight], "weight_decay": wd, "trust_ratio": True},
                      {"params": [bias], "weight_decay": 0.0, "trust_ratio": False}],
                     lr=lr, betas=(b1, b2), eps=eps)
    optimizer.step()

    # By hand, step 1: m = (1-b1) g, v = (1-b2) g^2; m_hat = g, v_hat = g^2 after bias correction.
    flat_w = [x for row in w0 for x in row]
    flat_g = [x for row in g for x in row]
    m_hat = [(1 - b1) * x / (1 - b1) for x in flat_g]
    v_hat = [(1 - b2) * x * x / (1 - b2) for x in flat_g]
    update = [m / (math.sqrt(v) + eps) + wd * w for m, v, w in zip(m_hat, v_hat, flat_w)]
    w_norm = math.sqrt(sum(x * x for x in flat_w))
    u_norm = math.sqrt(sum(x * x for x in update))
    trust = w_norm / u_norm
    expected = [w - lr * trust * u for w, u in zip(flat_w, update)]
    assert weight.detach().flatten().tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)

    # The bias group: no weight decay and no trust ratio, the plain Adam step.
    expected_bias = [0.3 - lr * 0.5 / (0.5 + eps), -0.6 + lr * 0.5 / (0.5 + eps)]
    assert bias.detach().tolist() == pytest.approx(expected_bias, rel=1e-12)

    state = optimizer.state[weight]
    assert state["step"].item() == 1
    assert state["exp_avg"].flatten().tolist() == pytest.approx([(1 - b1) * x for x in flat_g])


def test_second_step_uses_bias_correction_of_step_two():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    optimizer = Lamb([{"params": [p], "weight_decay": 0.0, "trust_ratio": False}], lr=0.1, betas=(0.9, 0.99), eps=0.0)
    grads = [torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)]
    expected = [1.0, 2.0]
    m, v = [0.0, 0.0], [0.0, 0.0]
    for t, grad in enumerate(grads, start=1):
        p.grad = grad.clone()
        optimizer.step()
        for i, gi in enumerate(grad.tolist()):
            m[i] = 0.9 * m[i] + 0.1 * gi
            v[i] = 0.99 * v[i] + 0.01 * gi * gi
            expected[i] -= 0.1 * (m[i] / (1 - 0.9**t)) / math.sqrt(v[i] / (1 - 0.99**t))
    assert p.detach().tolist() == pytest.approx(expected, rel=1e-12)


def test_no_decay_group_holds_biases_and_layernorm():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    decay, no_decay = parameter_groups(model, 0.01)
    assert [tuple(p.shape) for p in decay["params"]] == [(3, 4)]
    assert sorted(tuple(p.shape) for p in no_decay["params"]) == [(3,), (3,), (3,)]
    assert no_decay["weight_decay"] == 0.0 and no_decay["trust_ratio"] is False


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_state_exists_before_the_first_step(name):
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, OptimConfig(name=name), _plan())
    init_state(optimizer, name)
    assert len(optimizer.state_dict()["state"]) == 2
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():  # a real step afterwards behaves as a first step
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert all(optimizer.state[p]["step"].item() == 1 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_stable_adamw_takes_the_foreach_path_without_warning_each_worker():
    import warnings

    import optimi

    model = torch.nn.Linear(3, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # optimi's foreach deprecation would raise here
        optimizer = build_optimizer(model, OptimConfig(name="stableadamw", weight_decay=1e-5), _plan())
        again = type(optimizer)(optimizer.param_groups)  # as Horovod's DistributedOptimizer re-creates it
    assert all(group["foreach"] and not group["triton"] for group in again.param_groups)
    # the silencing is scoped: optimi's own class still warns outside hvdbert's
    with pytest.warns(DeprecationWarning, match="foreach"):
        optimi.StableAdamW(torch.nn.Linear(2, 2).parameters(), lr=1e-3, foreach=True, triton=False)


def _plan(**changes) -> Plan:
    fields = dict(workers=1, global_batch_size=8, micro_batch_size=8, accumulation_steps=1, lr=1.0,
                  warmup_steps=10, max_steps=110, max_seq_len=128, max_predictions_per_seq=20,
                  scaling="fixed-global", lr_scaling="none", reference_lr=1.0, reference_global_batch_size=8,
                  reference_workers=1, decay_power=1.0, end_lr=0.0)
    fields.update(changes)
    return Plan(**fields)


def test_schedule_warms_up_linearly_then_decays_polynomially():
    plan = _plan()
    assert lr_at(0, plan) == pytest.approx(0.1)
    assert lr_at(9, plan) == pytest.approx(1.0)
    assert lr_at(10, plan) == pytest.approx(1.0)
    assert lr_at(60, plan) == pytest.approx(0.5)
    assert lr_at(110, plan) == pytest.approx(0.0)
    root = _plan(decay_power=0.5, end_lr=0.1)
    assert lr_at(85, root) == pytest.approx(0.1 + 0.9 * 0.25**0.5)
