"""Real multi-process runs: horovodrun over Gloo and MPI, mpirun, and one plain process."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, FAST, REPO, TINY, read_metrics, run_module
from dist_probe import HALF_STEPS

pytestmark = pytest.mark.multiprocess

# Deterministic steps: no dropout, so runs that see the same data compute the same losses.
EXACT = FAST + ["--set", "model.hidden_dropout_prob=0.0", "--set", "model.attention_probs_dropout_prob=0.0",
                "--set", "train.log_every=1", "--set", "train.max_steps=8"]


def pretrain(tmp_path, env, name, np, launcher, extra=()):
    run_dir = tmp_path / name
    result = run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(run_dir), *EXACT, *extra],
                        env, np=np, launcher=launcher)
    return run_dir, result


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, hvdbert_env):
    """The command itself: np=1 (accumulation 2) and np=2 (accumulation 1) see the same data per step."""
    tmp = tmp_path_factory.mktemp("runs")
    one, _ = pretrain(tmp, hvdbert_env, "np1", 1, "plain")
    two, result = pretrain(tmp, hvdbert_env, "np2", 2, "gloo")
    return {"np1": read_metrics(one), "np2": read_metrics(two), "np2_stdout": result.stdout, "np2_dir": two}


# What one worker checks needs one plain process; what two check, one horovodrun job.
ONE_WORKER_CHECKS = ["bf16", "fp16", "compiled", "powersgd-adamw"]
TWO_WORKER_CHECKS = ["broadcast", "overflow", "waiting", "fp32-fp16-allreduce", "bf16", "bf16-fp16-allreduce", "fp16",
                     "fp16-fp16-allreduce", "compiled", "bf16-wire", "powersgd-adamw", "bucketed",
                     "bucketed-fp16-allreduce"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory, hvdbert_env):
    """tests/dist_probe.py's checks: out["np1"] / CHECK and out["np2"] / CHECK hold what they wrote."""
    out = {"np1": tmp_path_factory.mktemp("probe-np1"), "np2": tmp_path_factory.mktemp("probe-np2")}
    script = [sys.executable, str(REPO / "tests" / "dist_probe.py"), str(TINY)]
    subprocess.run([*script, str(out["np1"]), *ONE_WORKER_CHECKS], cwd=REPO, env=hvdbert_env, check=True,
                   capture_output=True, timeout=600)
    subprocess.run([str(BIN / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2", *script, str(out["np2"]),
                    *TWO_WORKER_CHECKS], cwd=REPO, env=hvdbert_env, check=True, capture_output=True, timeout=600)
    return out


def ranks(directory: Path) -> tuple[dict, dict]:
    return tuple(json.loads((directory / f"rank-{r}.json").read_text()) for r in (0, 1))


def test_parameters_identical_on_all_ranks_after_broadcast_and_steps(probe):
    rank0, rank1 = ranks(probe["np2"] / "broadcast")
    assert rank0["before"] != rank1["before"]  # the ranks really started apart
    assert rank0["after_broadcast"] == rank1["after_broadcast"]  # bit-identical
    assert rank0["after_broadcast"] == rank0["before"]  # rank 0's weights won
    assert rank0["after_steps"] == rank1["after_steps"]
    assert rank0["after_steps"] != rank0["after_broadcast"]  # the steps changed the weights
    assert set(rank0["optimizer_steps"]) == {4.0}  # no hidden extra step from the broadcast


def test_a_worker_waiting_for_a_late_peer_sleeps_instead_of_spinning(probe):
    # Horovod's own synchronize() spins a core for the whole wait; hvdbert polls and sleeps
    # (dist.poll_interval_ms), so a worker on a slow link leaves the cores to those computing.
    waits = json.loads((probe["np2"] / "waiting" / "rank-0.json").read_text())
    for name in ("gradients", "allreduce"):
        wait = waits[name]
        assert wait["wall_seconds"] >= 0.7, waits  # rank 0 really waited for the late rank 1
        assert wait["cpu_seconds"] <= 0.2 * wait["wall_seconds"], waits


def test_two_workers_equal_one_worker_with_accumulation(reference_runs):
    one, two = reference_runs["np1"], reference_runs["np2"]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    assert [r["accumulation_steps"] for r in (one[0], two[0])] == [2, 1]
    assert [r["workers"] for r in (one[0], two[0])] == [1, 2]
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    assert max(differences) <= 1e-5, differences
    assert one[-1]["loss"] < one[0]["loss"]  # and they did train


def test_gradient_buckets_equal_one_worker_with_accumulation(probe, reference_runs):
    # dist.bucket_mb: hvdbert's buckets of gradients, each allreduced once its last local pass is in
    # (two passes per step here), average what Horovod's per-tensor hooks average.
    one, bucketed = reference_runs["np1"], read_metrics(probe["np2"] / "bucketed")
    assert bucketed[0]["accumulation_steps"] == 2
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(one, bucketed, strict=True)]
    assert max(differences) <= 1e-5, differences


def test_gradient_buckets_in_fp16_equal_horovods_fp16_allreduce(probe):
    # the same float16 average per element, whether Horovod fused the tensors or hvdbert's buckets did
    hooks, bucketed = (read_metrics(probe["np2"] / name) for name in ("fp32-fp16-allreduce", "bucketed-fp16-allreduce"))
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(hooks, bucketed, strict=True)]
    assert max(differences) <= 1e-6, differences


def test_the_probes_training_is_the_commands(probe, reference_runs):
    # dist_probe's fp32-fp16-allreduce with the wire in full precision would be the np2 run: the same
    # build_run and train() pretrain runs, so the probe's other configurations stand for the command's.
    probed = read_metrics(probe["np2"] / "fp32-fp16-allreduce")
    assert [r["step"] for r in probed] == list(range(1, 9))
    assert probed[0]["loss"] == reference_runs["np2"][0]["loss"]  # step 1: before any allreduce mattered


def test_fp16_allreduce_stays_close_to_full_precision(probe, reference_runs):
    # fp16 compression rounds each averaged gradient to 11 significant bits on the wire; over 8
    # steps of the tiny model the per-step losses stay within 1e-3 of the fp32 allreduce.
    wire = read_metrics(probe["np2"] / "fp32-fp16-allreduce")
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(reference_runs["np2"], wire)]
    assert len(differences) == 8
    assert max(differences) <= 1e-3, differences


def test_bf16_on_the_wire_stays_close_to_full_precision(probe, reference_runs):
    # bf16 keeps 8 significant bits of each worker's gradient (fp16: 11), summed in float32.
    wire = read_metrics(probe["np2"] / "bf16-wire")
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(reference_runs["np2"], wire)]
    assert len(differences) == 8
    assert 0 < max(differences) <= 1e-3, differences  # rounded, and close


# The bound docs/compression.md states for PowerSGD runs on different worker counts (per-step loss).
POWERSGD_WORKER_COUNT_TOLERANCE = 1e-4


def test_powersgd_with_adamw_two_workers_match_one_worker_within_the_stated_bound(probe):
    # PowerSGD is linear in the gradient given the averaged factors, so N workers follow one worker's
    # recursion up to float rounding (docs/compression.md states the bound this checks).
    one, two = read_metrics(probe["np1"] / "powersgd-adamw"), read_metrics(probe["np2"] / "powersgd-adamw")
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    assert max(differences) <= POWERSGD_WORKER_COUNT_TOLERANCE, differences
    assert two[-1]["loss"] < two[0]["loss"]


# Mixed precision on CPU (torch's CPU autocast; fp16 with torch.amp.GradScaler("cpu")). np=1 with
# accumulation 2 and np=2 see the same micro-batches, so they differ only in how the two gradients
# are summed (locally vs. by the allreduce), which rounding activations to 8 (bf16) or 11 (fp16)
# significant bits can amplify. Measured over 8 steps on torch 2.13 CPU: np=1 vs np=2 at most
# 0.0 (bf16) and 1.5e-5 (fp16) apart; np=2 vs np=2 with fp16 allreduce 8.1e-5 (bf16), 1.1e-5 (fp16).
# The probe runs HALF_STEPS of them.
MIXED_EQUAL_TOLERANCE = 1e-4
MIXED_FP16_ALLREDUCE_TOLERANCE = 1e-3  # as for fp32 (test_fp16_allreduce_stays_close_to_full_precision)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_two_workers_equal_one_worker_with_accumulation(probe, reference_runs, precision):
    one, two = read_metrics(probe["np1"] / precision), read_metrics(probe["np2"] / precision)
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, HALF_STEPS + 1))
    assert [(r["workers"], r["accumulation_steps"]) for r in (one[0], two[0])] == [(1, 2), (2, 1)]
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    assert max(differences) <= MIXED_EQUAL_TOLERANCE, differences
    assert two[-1]["loss"] < two[0]["loss"]
    # Autocast really ran: the losses are not the fp32 run's.
    assert any(a["loss"] != b["loss"] for a, b in zip(two, reference_runs["np2"]))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_fp16_allreduce(probe, precision):
    two, wire = read_metrics(probe["np2"] / precision), read_metrics(probe["np2"] / f"{precision}-fp16-allreduce")
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(two, wire)]
    assert len(differences) == HALF_STEPS and all(math.isfinite(r["loss"]) for r in wire)
    assert max(differences) <= MIXED_FP16_ALLREDUCE_TOLERANCE, differences


def test_fp16_logs_the_scalers_skipped_steps(probe):
    runs = {name: read_metrics(probe[np] / name) for np, name in
            (("np1", "fp16"), ("np2", "fp16"), ("np2", "fp16-fp16-allreduce"))}
    for name, records in runs.items():
        counts = [r["scaler_skipped_steps"] for r in records]
        assert counts == sorted(counts), (name, counts)
    # The scaler decides from the averaged gradients: one worker and two skip the same steps.
    one, two = (read_metrics(probe[np] / "fp16") for np in ("np1", "np2"))
    assert [r["scaler_skipped_steps"] for r in one] == [r["scaler_skipped_steps"] for r in two]
    assert all("scaler_skipped_steps" not in r for r in read_metrics(probe["np2"] / "bf16"))


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank(probe):
    rank0, rank1 = ranks(probe["np2"] / "overflow")
    steps, overflow_step = rank0["steps"], rank0["overflow_step"]
    # Only rank 1's backward overflowed, and its loss stayed finite (the step guard did not fire).
    assert all(math.isfinite(x) for x in rank0["losses"] + rank1["losses"])
    expected = [0] * overflow_step + [1] * (steps - overflow_step)
    assert rank0["skipped_steps"] == rank1["skipped_steps"] == expected
    assert rank0["scales"] == rank1["scales"]
    assert rank0["scales"][overflow_step] == rank0["scales"][overflow_step - 1] / 2  # backed off
    assert rank0["fingerprints"] == rank1["fingerprints"]  # bit-identical after every step
    fingerprints = rank0["fingerprints"]  # [before step 0, after step 0, ...]
    assert fingerprints[overflow_step + 1] == fingerprints[overflow_step]  # the skipped step changed nothing
    assert all(fingerprints[i + 1] != fingerprints[i] for i in range(steps) if i != overflow_step)
    assert rank0["optimizer_steps"] == rank1["optimizer_steps"] == [float(steps - 1)]


def test_compiled_two_workers_equal_one_worker_with_accumulation(probe, reference_runs):
    """train.compile = true: the encoder and head run under torch.compile (inductor, on CPU here)."""
    one, two = read_metrics(probe["np1"] / "compiled"), read_metrics(probe["np2"] / "compiled")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    assert max(differences) <= 1e-5, differences
    # The first loss comes from the initial weights, before the learning-rate schedule (which
    # depends on max_steps) matters: the compiled model computes what the eager one does. (Measured:
    # one process, 4 steps, eager and compiled losses bit-identical.)
    assert abs(two[0]["loss"] - reference_runs["np2"][0]["loss"]) <= 1e-5


def test_run_directory_contents(reference_runs):
    run_dir = reference_runs["np2_dir"]
    record = read_metrics(run_dir)[-1]
    for key in ("step", "loss", "lr", "workers", "global_batch_size", "micro_batch_size", "accumulation_steps",
                "seq_per_s", "tokens_per_s", "samples_seen"):
        assert key in record
    assert record["samples_seen"] == 8 * 32 and record["global_batch_size"] == 32
    assert record["tokens_per_s"] == pytest.approx(record["seq_per_s"] * 64, rel=0.05)  # packed: no padding
    resolved = json.loads((run_dir / "recipe.json").read_text())
    assert resolved["plan"]["workers"] == 2 and resolved["plan"]["accumulation_steps"] == 1
    assert resolved["train"]["max_steps"] == 8 and resolved["model"]["hidden_size"] == 128
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tb").iterdir())
    summary = [line for line in reference_runs["np2_stdout"].splitlines() if "hvdbert: done:" in line]
    assert len(summary) == 1 and "8 steps, 256 samples seen, final loss" in summary[0]


@pytest.mark.parametrize("launcher", ["mpi", "mpirun"])
def test_mpi_launchers_match_gloo(tmp_path, hvdbert_env, reference_runs, launcher):
    run_dir, _ = pretrain(tmp_path, hvdbert_env, launcher, 2, launcher)
    losses = [r["loss"] for r in read_metrics(run_dir)]
    expected = [r["loss"] for r in reference_runs["np2"]]
    assert max(abs(a - b) for a, b in zip(losses, expected)) <= 1e-5


def test_indivisible_worker_count_is_one_line_exit_2(tmp_path, hvdbert_env):
    result = run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(tmp_path / "r"), *FAST,
                                             "--set", "batch.global_batch_size=48"],
                        hvdbert_env, np=2, launcher="gloo", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "hvdbert.pretrain: error:" in line]
    assert errors and all(
        "2 workers cannot split batch.global_batch_size = 48 into micro-batches of 16 (3 per step is not "
        "divisible by 2); worker counts that work nearby: 1 or 3" in line for line in errors)
    # Each worker printed its one line and exited 2; horovodrun then reports the failed workers in
    # its own words (with a traceback of its own), which hvdbert does not control.
    worker_lines = [line for line in result.stderr.splitlines() if line.startswith(("[0]<", "[1]<"))]
    assert "Exit code: 2" in result.stderr or "exit code: 2" in result.stderr.lower()
    assert not any("Traceback" in line for line in worker_lines)
    assert not (tmp_path / "r").exists()  # failed before writing anything
