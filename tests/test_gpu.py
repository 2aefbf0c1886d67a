"""What only a GPU can check, run by tools/gpu-check.sh on a GPU machine (skipped elsewhere): the tiny
recipe trains on CUDA in fp16 (torch.amp GradScaler), bf16 and fp32, with finite losses that agree
with fp32 within stated tolerances, and under `train.compile` with the eager losses. Every CUDA run
feeds its batches through the pinned-memory stream and non-blocking copies (hvdbert/train.py), so
the agreement with fp32 covers those copies too.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import FAST, read_metrics, run_main

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu-check.sh)")

STEPS = 8


def train(tmp_path, name: str, *extra: str) -> list[dict]:
    run_dir = tmp_path / name
    status = run_main("hvdbert.pretrain", ["--recipe", "recipes/tiny.toml", "--output", str(run_dir), *FAST,
                                           "--set", f"train.max_steps={STEPS}", "--set", "train.log_every=1",
                                           *extra])
    assert status == 0
    return read_metrics(run_dir)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, hvdbert_env):
    return train(tmp_path_factory.mktemp("fp32"), "run", "--set", "train.precision=fp32")


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.05), ("fp16", 0.01)])
def test_mixed_precision_on_the_gpu_follows_fp32(tmp_path, fp32, precision, tolerance):
    records = train(tmp_path, precision, "--set", f"train.precision={precision}")
    losses = [r["loss"] for r in records]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    for mixed, full in zip(losses, (r["loss"] for r in fp32)):
        assert abs(mixed - full) <= tolerance * abs(full), (losses, [r["loss"] for r in fp32])
    if precision == "fp16":
        # GradScaler on CUDA: a few skipped steps at most while the scale backs off.
        assert records[-1]["scaler_skipped_steps"] < STEPS // 2


def test_compile_on_the_gpu_matches_eager(tmp_path, fp32):
    compiled = train(tmp_path, "compiled", "--set", "train.precision=fp32", "--set", "train.compile=true")
    for a, b in zip(compiled, fp32):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
