"""pretrain's bad-input handling and precision paths, as one plain process."""
from __future__ import annotations

import math

import pytest

from conftest import FAST, TINY, read_metrics, run_module


@pytest.mark.parametrize("extra, expected", [
    (["--set", "train.max_step=3"], "unknown key train.max_step; did you mean train.max_steps?"),
    (["--set", "optim.lr=fast"], "optim.lr = 'fast' has the wrong type; expected a number"),
    (["--set", "data.max_seq_len=256"], "data.max_seq_len = 256 exceeds model.max_position_embeddings = 128"),
    (["--recipe", "missing.toml"], "recipe file not found"),
    (["--data", "/nonexistent/data"], "data directory not found: /nonexistent/data"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, hvdbert_env, extra, expected):
    run_dir = tmp_path / "run"
    result = run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(run_dir), *FAST, *extra],
                        hvdbert_env, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_existing_run_is_not_overwritten(tmp_path, hvdbert_env):
    run_dir = tmp_path / "run"
    args = ["--recipe", str(TINY), "--output", str(run_dir), *FAST, "--set", "train.max_steps=2",
            "--set", "train.log_every=1"]
    run_module("hvdbert.pretrain", args, hvdbert_env)
    before = (run_dir / "metrics.jsonl").read_bytes()
    result = run_module("hvdbert.pretrain", args, hvdbert_env, check=False)
    assert result.returncode == 2 and "already holds a run" in result.stderr
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_bf16_autocast_trains_on_cpu(tmp_path, hvdbert_env):
    run_dir = tmp_path / "bf16"
    run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(run_dir), *FAST,
                                    "--set", "train.precision=bf16", "--set", "train.max_steps=6",
                                    "--set", "train.log_every=3", "--set", "optim.name=adamw"], hvdbert_env)
    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_precision_support_is_asked_of_the_installed_torch():
    """pretrain refuses a precision this torch cannot run on the CPU (one line, exit 2; choose_device)
    and runs the others: torch 2.13's CPU autocast has float16 and bfloat16, and a CPU GradScaler."""
    import torch

    from hvdbert.train import Precision

    assert Precision.supported("fp32", "cpu")
    assert Precision.supported("bf16", "cpu") and Precision.supported("fp16", "cpu")
    assert isinstance(Precision.create("fp16", torch.device("cpu")).scaler, torch.amp.GradScaler)
    # A device type without autocast gets the refusal.
    assert not Precision.supported("bf16", "meta") and not Precision.supported("fp16", "meta")
