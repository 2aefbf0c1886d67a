"""Failures without elastic: a dead rank ends the job in bounded time; diverging training stops cleanly."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil
import pytest
import torch

from conftest import BIN, FAST, REPO, TINY, rank_pid, read_metrics, run_module
from hvdbert.dist import STACKS_SIGNAL


def signal_rank_1_and_time_the_exit(command: list[str], run_dir: Path, tmp_path: Path, env, signum: int,
                                    timeout: float, then: Callable[[], None] | None = None) -> tuple[int, float]:
    """Start `command` (a 2-rank job writing run_dir), let it log 3 steps, send `signum` to rank 1 (and
    call `then`, when given), and return the job's exit status and the seconds from the signal to its
    exit (rank 1 is killed at the end if it is still there, a stopped one included)."""
    victim = None
    with open(tmp_path / "log", "w") as log:
        job = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.monotonic() < deadline:
            time.sleep(0.1)
        victim = rank_pid(run_dir, 1)
        assert victim is not None, (tmp_path / "log").read_text()[-3000:]
        os.kill(victim, signum)
        signalled = time.monotonic()
        if then is not None:
            then()
        status = job.wait(timeout=timeout)
        return status, time.monotonic() - signalled
    finally:
        if job.poll() is None:
            job.kill()
        if victim is not None and psutil.pid_exists(victim):
            os.kill(victim, signal.SIGKILL)


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["gloo", "mpi"])
def test_dead_rank_ends_the_job_non_zero_in_bounded_time(tmp_path, hvdbert_env, launcher):
    run_dir = tmp_path / "run"
    command = [str(BIN / "horovodrun"), f"--{launcher}", "-np", "2", "-H", "localhost:2", sys.executable, "-m",
               "hvdbert.pretrain", "--recipe", str(TINY), "--output", str(run_dir), *FAST,
               "--set", "train.log_every=1", "--set", "train.max_steps=1000"]
    status, seconds = signal_rank_1_and_time_the_exit(command, run_dir, tmp_path, hvdbert_env, signal.SIGKILL,
                                                      timeout=120)
    print(f"{launcher}: rank 1 killed; job exited {status} after {seconds:.1f} s")
    assert status != 0
    assert seconds < 60
    assert rank_pid(run_dir, 0) is None  # rank 0 did not stay behind


@pytest.mark.multiprocess
def test_non_finite_losses_stop_with_a_diagnostic_checkpoint(tmp_path, hvdbert_env):
    # AdamW with lr 1e30 overflows the weights at the first step: every later loss is NaN.
    run_dir = tmp_path / "run"
    result = run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(run_dir), *FAST,
                                             "--set", "train.log_every=1", "--set", "train.max_steps=50",
                                             "--set", "optim.name=adamw", "--set", "optim.lr=1e30",
                                             "--set", "train.grad_clip_norm=0.0", "--set", "train.max_bad_steps=2"],
                        hvdbert_env, np=2, launcher="gloo", check=False)
    assert result.returncode != 0
    assert "3 consecutive steps (up to step 4) had a non-finite loss, more than train.max_bad_steps = 2" in result.stderr
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert math.isfinite(records[0]["loss"]) and not any(math.isfinite(r["loss"]) for r in records[1:])
    diagnostic = run_dir / "checkpoints" / "diagnostic-step-4"
    state = json.loads((diagnostic / "state.json").read_text())
    assert state["kind"] == "diagnostic" and state["step"] == 4
    assert not list((run_dir / "checkpoints").glob("step-*"))  # --resume auto will not pick it


def test_grad_scaler_skipped_steps_are_counted_and_leave_the_model_alone():
    """The fp16 bookkeeping of train_step with torch's CPU GradScaler: a scale so large that the
    scaled loss overflows makes the scaler skip the step."""
    from hvdbert.dist import SingleProcess
    from hvdbert.model import PretrainingForward, build_model
    from hvdbert.optimizers.lamb import Lamb
    from hvdbert.state import Precision
    from hvdbert.train import train_step

    torch.manual_seed(0)
    model = build_model({"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "intermediate_size": 32, "max_position_embeddings": 32}, with_nsp=False)
    optimizer = Lamb([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    precision = Precision("fp32", torch.device("cpu"), torch.amp.GradScaler("cpu", init_scale=2.0**127))
    batch = {"input_ids": torch.randint(5, 64, (2, 16)), "masked_positions": torch.tensor([[1, 2], [3, 4]]),
             "masked_labels": torch.tensor([[7, 8], [9, 10]])}
    before = [p.detach().clone() for p in model.parameters()]
    train_step(PretrainingForward(model), optimizer, [batch], SingleProcess(), precision, grad_clip_norm=1.0)
    assert precision.skipped_steps == 1  # 2**127 x loss overflows float32: skipped, scale halved
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    precision.scaler.update(2.0**8)
    train_step(PretrainingForward(model), optimizer, [batch], SingleProcess(), precision, grad_clip_norm=1.0)
    assert precision.skipped_steps == 1  # a sane scale: the step is taken
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# dist.stall_timeout_seconds in the frozen-worker test: far above a tiny step's collective waits (well
# under a second here), short enough that three launchers cost little time
STALL_SECONDS = 8


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["gloo", "mpi", "mpirun"])
def test_frozen_rank_ends_the_job_within_the_stall_bound(tmp_path, hvdbert_env, launcher):
    """A rank stopped with SIGSTOP (as a hung NFS mount or a paused VM would) never exits; Horovod's
    stall shutdown cannot see it under MPI (hvdbert.dist.CollectiveWatchdog says why), so each
    worker's watchdog ends the job once one collective waited dist.stall_timeout_seconds."""
    run_dir = tmp_path / "run"
    pretrain = [sys.executable, "-m", "hvdbert.pretrain", "--recipe", str(TINY), "--output", str(run_dir), *FAST,
                "--set", "train.log_every=1", "--set", "train.max_steps=1000",
                "--set", f"dist.stall_timeout_seconds={STALL_SECONDS}"]
    if launcher == "mpirun":
        command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", *pretrain]
    else:
        command = [str(BIN / "horovodrun"), f"--{launcher}", "-np", "2", "-H", "localhost:2", *pretrain]

    def ask_rank_0_where_it_waits() -> None:  # as a user would, with `kill -USR2`
        time.sleep(2)  # well inside the stall bound: rank 0 is waiting for the frozen rank 1 by now
        os.kill(rank_pid(run_dir, 0), STACKS_SIGNAL)

    # the bound on this test: stall bound + teardown
    status, seconds = signal_rank_1_and_time_the_exit(command, run_dir, tmp_path, hvdbert_env, signal.SIGSTOP,
                                                      timeout=STALL_SECONDS + 120, then=ask_rank_0_where_it_waits)
    output = (tmp_path / "log").read_text()
    print(f"{launcher}: rank 1 frozen; job exited {status} after {seconds:.1f} s")
    assert status != 0, output[-3000:]
    stall = f"longer than dist.stall_timeout_seconds = {STALL_SECONDS}"
    # SIGUSR2 printed every thread's stack (the watchdog's among them) and rank 0 went on waiting
    before_stall = output.split(stall)[0]
    assert "(most recent call first)" in before_stall and "in _watch" in before_stall, output[-3000:]
    if launcher != "gloo":  # over Gloo, Gloo's own 30 s timeout may end it first
        assert stall in output, output[-3000:]
        # ...and the watchdog prints them again as it ends the worker
        assert "(most recent call first)" in output.split(stall)[1], output[-3000:]
    assert rank_pid(run_dir, 0) is None


# A worker in a collective: with "stop", it stops itself (SIGSTOP) as soon as it waits, as a frozen
# worker would, at a known point: a stop sent from outside could come after the 2 s bound on a loaded
# machine, and then the line rightly blames another worker.
WATCHED = """\
import os, signal, sys, time
from hvdbert.dist import CollectiveWatchdog
watchdog = CollectiveWatchdog(2.0, lambda: "rank 1 (host h)")
with watchdog.waiting("the gradient allreduce"):
    if sys.argv[1] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(30)
"""


@pytest.mark.parametrize("stopped_for", [0.0, 5.0])
def test_the_stall_line_says_when_the_worker_itself_was_stopped(stopped_for):
    """A worker frozen for longer than the bound and then continued (the job's teardown sends SIGCONT
    before it ends it) would blame another worker for its own stop: its watchdog sees that it did
    not run, and says so."""
    watched = subprocess.Popen([sys.executable, "-c", WATCHED, "stop" if stopped_for else "wait"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if stopped_for:
            process, deadline = psutil.Process(watched.pid), time.monotonic() + 60
            while process.status() != psutil.STATUS_STOPPED:
                assert time.monotonic() < deadline and watched.poll() is None, "the worker never stopped"
                time.sleep(0.05)
            time.sleep(stopped_for)
            watched.send_signal(signal.SIGCONT)
        status = watched.wait(timeout=60)
    finally:
        watched.kill()
    err = watched.stderr.read()
    assert status == 4 and "rank 1 (host h) waited" in err and "(most recent call first)" in err, err
    if stopped_for:
        assert "this worker itself did not run for" in err and "another worker" not in err, err
    else:
        assert "another worker is frozen or cut off" in err and "itself" not in err, err
