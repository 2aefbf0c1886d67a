"""Exact resume and resume on another worker count, as real multi-process runs.

One uninterrupted reference run (horovodrun --gloo -np 2, 12 steps, dropout on, a checkpoint every 4
steps); the other runs start from its checkpoints and must reproduce its per-step losses and read
exactly the same samples (by sample id).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from conftest import BIN, FAST, REPO, TINY, read_metrics, run_main, run_module
from hvdbert.checkpoint import step_dirs

pytestmark = pytest.mark.multiprocess

# Dropout stays on (tiny.toml: 0.1): resume must reproduce the dropout masks too.
RESUMABLE = FAST + ["--set", "train.log_every=1", "--set", "train.max_steps=12", "--set", "checkpoint.every_steps=4",
                    "--set", "checkpoint.keep=5", "--set", "data.record_sample_ids=true"]
GLOBAL_BATCH = 32


def pretrain(run_dir: Path, env, np: int, launcher: str, extra=()):
    return run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(run_dir), *RESUMABLE, *extra],
                      env, np=np, launcher=launcher)


def losses(run_dir: Path) -> dict[int, float]:
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), steps  # every step logged once, in order
    return {r["step"]: r["loss"] for r in records}


def step_sample_ids(run_dir: Path) -> list[list[int]]:
    """Per step, the ids every rank read (ranks' lines of the same step joined)."""
    per_rank = [p.read_text().splitlines() for p in sorted((run_dir / "sample_ids").glob("rank-*.txt"))]
    steps = max(len(lines) for lines in per_rank)
    return [sorted(int(i) for lines in per_rank if k < len(lines) for i in lines[k].split()) for k in range(steps)]


def copy_stopped_at(reference: Path, destination: Path, step: int) -> Path:
    """The reference run as it was when it had just written checkpoint `step` (later ones removed;
    the logs beyond that step are cut by the resumed run itself)."""
    shutil.copytree(reference, destination)
    for path in (destination / "checkpoints").iterdir():
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    return destination


def assert_same_weights(a: Path, b: Path, atol: float) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, worst
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory, hvdbert_env) -> Path:
    run_dir = tmp_path_factory.mktemp("resume") / "reference-np2"
    pretrain(run_dir, hvdbert_env, 2, "gloo")
    assert [s for s in losses(run_dir)] == list(range(1, 13))
    return run_dir


def test_resume_reproduces_the_uninterrupted_run(reference, hvdbert_env, tmp_path):
    """np=2 stopped after step 4, resumed with --resume auto at np=2: steps 5..12 as if never stopped."""
    run_dir = copy_stopped_at(reference, tmp_path / "resumed-np2", 4)
    result = pretrain(run_dir, hvdbert_env, 2, "gloo", ["--resume", "auto"])
    assert "resumed from" in result.stderr and "step 4, 128 samples seen" in result.stderr
    expected, got = losses(reference), losses(run_dir)
    assert list(got) == list(range(1, 13))
    differences = [abs(expected[s] - got[s]) for s in range(5, 13)]
    print("np2 -> np2 loss differences, steps 5-12:", differences)
    assert max(differences) <= 1e-6, differences
    assert_same_weights(reference / "checkpoints" / "step-12", run_dir / "checkpoints" / "step-12", atol=1e-6)
    assert step_sample_ids(run_dir) == step_sample_ids(reference)


@pytest.fixture(scope="module")
def resumed_on_one_worker(reference, hvdbert_env, tmp_path_factory) -> Path:
    run_dir = copy_stopped_at(reference, tmp_path_factory.mktemp("resume-np1") / "run", 4)
    assert run_main("hvdbert.pretrain", ["--recipe", TINY, "--output", run_dir, *RESUMABLE, "--resume", "auto"]) == 0
    return run_dir


def test_resume_on_fewer_workers_keeps_global_batch_and_data_position(reference, resumed_on_one_worker):
    """Checkpointed at np=2 (accumulation 1), resumed at np=1 (accumulation 2)."""
    run_dir = resumed_on_one_worker
    records = read_metrics(run_dir)
    assert [(r["workers"], r["accumulation_steps"]) for r in records if r["step"] > 4] == [(1, 2)] * 8
    assert all(r["global_batch_size"] == GLOBAL_BATCH for r in records)
    assert records[-1]["samples_seen"] == 12 * GLOBAL_BATCH
    expected, got = losses(reference), losses(run_dir)
    differences = [abs(expected[s] - got[s]) for s in range(5, 13)]
    print("np2 -> np1 loss differences, steps 5-12:", differences)
    assert max(differences) <= 1e-5, differences

    # By sample id: the resumed run read exactly the reference's samples at every step.
    ids, reference_ids = step_sample_ids(run_dir), step_sample_ids(reference)
    assert len(ids) == 12 and ids == reference_ids
    every_id = [i for step in ids for i in step]
    assert len(every_id) == 12 * GLOBAL_BATCH == len(set(every_id))  # none skipped, none repeated
    state = json.loads((run_dir / "checkpoints" / "step-8" / "state.json").read_text())
    assert state["world_size"] == 1 and state["samples_seen"] == 8 * GLOBAL_BATCH  # global units: any worker count


def test_resume_on_more_workers(reference, resumed_on_one_worker, hvdbert_env, tmp_path):
    """The reverse: a checkpoint written by 1 worker (step 8 of the run above) resumed by 2."""
    run_dir = copy_stopped_at(resumed_on_one_worker, tmp_path / "np1-to-np2", 8)
    result = pretrain(run_dir, hvdbert_env, 2, "gloo", ["--resume", str(run_dir / "checkpoints" / "step-8")])
    assert "saved by 1 workers" in result.stderr
    records = read_metrics(run_dir)
    assert [(r["workers"], r["accumulation_steps"]) for r in records if r["step"] > 8] == [(2, 1)] * 4
    expected, got = losses(reference), losses(run_dir)
    differences = [abs(expected[s] - got[s]) for s in range(9, 13)]
    print("np1 -> np2 loss differences, steps 9-12:", differences)
    assert max(differences) <= 1e-5, differences
    ids = step_sample_ids(run_dir)
    assert ids == step_sample_ids(reference)
    assert len({i for step in ids for i in step}) == 12 * GLOBAL_BATCH
    assert_same_weights(reference / "checkpoints" / "step-12", run_dir / "checkpoints" / "step-12", atol=1e-4)


def worker_pids(run_dir: Path) -> dict[int, int]:
    """rank -> pid of the pretrain workers writing to run_dir."""
    found = {}
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "hvdbert.pretrain" in command and str(run_dir) in command and "horovodrun" not in command:
            try:
                rank = process.environ().get("HOROVOD_RANK")
            except psutil.Error:
                continue
            if rank is not None:
                found[int(rank)] = process.info["pid"]
    return found


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def test_sigterm_saves_a_checkpoint_exits_0_and_resumes_exactly(reference, hvdbert_env, tmp_path):
    """SIGTERM to ONE rank (as a scheduler's signal may reach one process first): every rank finishes
    the step, rank 0 saves, the job exits 0; --resume auto then reproduces the reference."""
    run_dir = tmp_path / "preempted"
    log_path = tmp_path / "preempted.log"
    command = [str(BIN / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2", sys.executable, "-m",
               "hvdbert.pretrain", "--recipe", str(TINY), "--output", str(run_dir), *RESUMABLE,
               "--set", "checkpoint.every_steps=100"]
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, cwd=REPO, env=hvdbert_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # mid-run: after step 1 is logged (signal handlers are installed before training starts)
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 1, 240, "step 1")
        pids = wait_for(lambda: worker_pids(run_dir).get(0) and worker_pids(run_dir), 30, "worker pids")
        os.kill(pids[0], signal.SIGTERM)
        assert launcher.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = log_path.read_text()
    assert "SIGTERM received" in output and "stopped by SIGTERM" in output
    saved = [s for s, _ in step_dirs(run_dir)]
    assert len(saved) == 1 and 1 <= saved[0] < 12, saved
    stopped_at = saved[0]
    assert read_metrics(run_dir)[-1]["step"] == stopped_at
    print(f"SIGTERM: stopped and saved at step {stopped_at}")

    pretrain(run_dir, hvdbert_env, 2, "gloo", ["--resume", "auto"])
    expected, got = losses(reference), losses(run_dir)
    assert list(got) == list(range(1, 13))
    differences = [abs(expected[s] - got[s]) for s in range(1, 13)]
    print("SIGTERM + resume vs uninterrupted, steps 1-12:", differences)
    assert max(differences) <= 1e-6, differences
    assert step_sample_ids(run_dir) == step_sample_ids(reference)
    assert all(math.isfinite(v) for v in got.values())
