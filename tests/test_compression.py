"""Gradient compression (dist.compression, hvdbert/compression.py): the one-line refusals, the bytes
each option sends, PowerSGD's error feedback, and its state in checkpoints: exact resume on the same
worker count (two workers over Gloo, resumed over MPI) and on another count what
docs/compression.md says (every worker starts from the saved workers' mean error, with one warning).
bf16 on the wire and PowerSGD under AdamW on 1 and 2 workers: test_core_distributed.py's probe."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import FAST, TINY, read_metrics, run_main_captured, run_module
from hvdbert.compression import SINGLE_PROCESS, PowerSGD, compressed_bytes, wire_bytes_per_worker
from hvdbert.model import build_model

# No dropout: the runs compared here differ only by where gradients were summed and what was resumed.
# Micro-batches of 8: accumulation on one worker (4) and on two (2) alike.
POWERSGD = FAST + ["--set", "dist.compression=powersgd", "--set", "train.log_every=1", "--set", "train.max_steps=8",
                   "--set", "checkpoint.every_steps=4", "--set", "batch.micro_batch_size=8",
                   "--set", "model.hidden_dropout_prob=0.0", "--set", "model.attention_probs_dropout_prob=0.0"]
# The bound docs/compression.md states for PowerSGD runs on different worker counts (per-step loss).
POWERSGD_WORKER_COUNT_TOLERANCE = 1e-4


@pytest.mark.parametrize("overrides, message", [
    (["dist.compression=zstd"], "dist.compression = 'zstd' is not valid; choose one of none, fp16, bf16, powersgd"),
    (["dist.fp16_allreduce=true", "dist.compression=powersgd"],
     "dist.fp16_allreduce = true (fp16 on the wire) conflicts with dist.compression = powersgd"),
    (["dist.compression=powersgd", "train.precision=fp16"],
     "dist.compression = powersgd does not run with train.precision = fp16"),
    (["dist.bucket_mb=-1"], "dist.bucket_mb = -1.0 must be 0 (Horovod's per-tensor allreduces) or more"),
])
def test_bad_compression_settings_are_refused_in_one_line(cli, tmp_path, overrides, message):
    sets = [arg for override in overrides for arg in ("--set", override)]
    returncode, lines = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", tmp_path / "run", *FAST,
                                                 *sets]).exit_and_stderr_lines()
    assert returncode == 2 and len(lines) == 1, lines
    assert message in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_compression_under_elastic_is_refused_in_one_line(cli, tmp_path):
    returncode, lines = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", tmp_path / "run", "--elastic", *FAST,
                                                 "--set", "dist.compression=powersgd"]).exit_and_stderr_lines()
    assert returncode == 2 and len(lines) == 1, lines
    assert "--elastic does not run with dist.compression = powersgd" in lines[0]


def test_gradient_buckets_under_elastic_are_refused_in_one_line(cli, tmp_path):
    returncode, lines = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", tmp_path / "run", "--elastic", *FAST,
                                                 "--set", "dist.bucket_mb=1"]).exit_and_stderr_lines()
    assert returncode == 2 and len(lines) == 1, lines
    assert "--elastic does not run with dist.bucket_mb = 1; use dist.bucket_mb = 0" in lines[0]


def test_powersgd_with_adamw_trains_and_warns_once(cli, tmp_path):
    """The measured plateau delay (docs/compression.md) is said, not refused."""
    outcome = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", tmp_path / "run", *FAST, "--set", "train.max_steps=1",
                                       "--set", "dist.compression=powersgd", "--set", "optim.name=adamw"])
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    warnings = [line for line in outcome.stderr.splitlines() if "powersgd with optim.name = adamw" in line]
    assert len(warnings) == 1 and warnings[0].startswith("hvdbert: warning: "), outcome.stderr


def test_fp16_allreduce_still_means_fp16():
    from hvdbert.config import load_recipe

    for overrides in (["dist.fp16_allreduce=true"], ["dist.fp16_allreduce=true", "dist.compression=fp16"],
                      ["dist.compression=fp16"]):
        assert load_recipe(TINY, overrides).dist.wire_compression == "fp16"
    assert load_recipe(TINY).dist.wire_compression == "none"


def test_bytes_per_step_of_bert_base():
    with torch.device("meta"):  # shapes only
        model = build_model({"architecture": "bert"}, with_nsp=True)
    shapes = [p.shape for p in model.parameters() if p.requires_grad]
    full = compressed_bytes(shapes, "none", 4)
    assert full == 4 * sum(s.numel() for s in shapes)
    assert compressed_bytes(shapes, "fp16", 4) == compressed_bytes(shapes, "bf16", 4) == full // 2
    # rank 4: each 768 x 768 matrix sends 4 x (768 + 768) floats instead of 768 x 768
    assert full / compressed_bytes(shapes, "powersgd", 4) > 100
    assert full / compressed_bytes(shapes, "powersgd", 32) > 8
    assert wire_bytes_per_worker(shapes, "none", 2, 4) == full  # a ring allreduce: 2 (N-1)/N x payload
    assert wire_bytes_per_worker(shapes, "bf16", 4, 4) == 3 * full / 2  # an allgather: (N-1) x payload
    assert wire_bytes_per_worker(shapes, "powersgd", 1, 4) == 0


def test_powersgd_error_feedback_loses_nothing_over_steps():
    """What a step leaves out of the gradient is carried to later steps: the sum of what was applied
    plus the remaining error is the sum of the gradients (exact arithmetic; float rounding here)."""
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.zeros(64, 48)), torch.nn.Parameter(torch.zeros(48))
    compressor = PowerSGD([weight, bias], rank=2, start_step=1, seed=3)
    assert compressor.matrices == [weight] and compressor.vectors == [bias]
    given, applied = torch.zeros(64, 48), torch.zeros(64, 48)
    for step in range(6):
        gradient = torch.randn(64, 48)
        weight.grad, bias.grad = gradient.clone(), torch.ones(48)
        compressor.reduce(SINGLE_PROCESS)
        if step == 0:  # start_step: the first step goes uncompressed
            assert torch.equal(weight.grad, gradient)
        else:
            assert torch.linalg.matrix_rank(weight.grad) <= 2
        assert torch.equal(bias.grad, torch.ones(48))  # vectors are never compressed
        given += gradient
        applied += weight.grad
    assert torch.allclose(applied + compressor.errors[0], given, atol=1e-4)
    assert float(compressor.errors[0].abs().max()) > 0.1  # there was something to carry
    # A non-finite gradient keeps the state (the step guard skips the update) instead of poisoning it.
    errors, factors = compressor.errors[0].clone(), compressor.q[0].clone()
    weight.grad = torch.full((64, 48), float("nan"))
    compressor.reduce(SINGLE_PROCESS)
    assert torch.equal(compressor.errors[0], errors) and torch.equal(compressor.q[0], factors)


def copy_stopped_at(reference, destination, step: int):
    shutil.copytree(reference, destination)
    for path in (destination / "checkpoints").iterdir():
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    return destination


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.mark.multiprocess
def test_powersgd_two_workers_resume_exactly_over_mpi_and_on_one_worker_within_the_bound(tmp_path, hvdbert_env):
    reference = tmp_path / "reference-np2"
    run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(reference), *POWERSGD], hvdbert_env,
               np=2, launcher="gloo")
    expected = losses(reference)
    assert list(expected) == list(range(1, 9)) and expected[8] < expected[1]
    state = torch.load(reference / "checkpoints/step-4/training.pt", weights_only=True)["compression"]
    assert state["steps"] == 4 and len(state["errors"]) == 2  # the factors once, the errors per worker
    assert not torch.equal(state["errors"][0], state["errors"][1])
    # The same worker count, over MPI this time: the per-worker errors are restored, losses equal.
    same = copy_stopped_at(reference, tmp_path / "same-count", 4)
    run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(same), "--resume", "auto", *POWERSGD],
               hvdbert_env, np=2, launcher="mpi")
    assert losses(same) == expected
    # One worker: it starts from the two workers' mean error, says so in one line, and follows the
    # same course up to rounding.
    other = copy_stopped_at(reference, tmp_path / "one-worker", 4)
    outcome = run_main_captured("hvdbert.pretrain", ["--recipe", TINY, "--output", other, "--resume", "auto",
                                                     *POWERSGD])
    assert outcome.returncode == 0
    notes = [line for line in outcome.stderr.splitlines() if "PowerSGD state saved by 2 workers" in line]
    assert len(notes) == 1, outcome.stderr
    differences = [abs(losses(other)[step] - expected[step]) for step in range(5, 9)]
    assert max(differences) <= POWERSGD_WORKER_COUNT_TOLERANCE, differences
