"""Horovod elastic on localhost: a worker is killed mid-run, the job finishes on the survivor.

Two "hosts" that are both this machine (localhost and 127.0.0.1, one slot each) come from
launch/discover_hosts.sh via HVDBERT_HOSTS_FILE: Horovod blacklists the host of a failed worker, and
with a single host name the survivor would be blacklisted with it.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from conftest import (BIN, FAST, REPO, TINY, assert_each_sample_once_per_epoch, committed_sample_ids, rank_pid,
                      read_metrics, run_module, uninterrupted_sample_ids)
from hvdbert.dist import STACKS_SIGNAL

MAX_STEPS, GLOBAL_BATCH, COMMIT_EVERY = 40, 32, 5


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


@pytest.mark.multiprocess
def test_killed_worker_job_continues_on_the_survivor(tmp_path, hvdbert_env, finished_run):
    # Both "hosts" have a local rank 0, and each would prepare the embedded corpus into the shared
    # cache at once: finished_run trained on it, so it is prepared already.
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:1\n127.0.0.1:1\n")
    run_dir = tmp_path / "run"
    env = {**hvdbert_env, "HVDBERT_HOSTS_FILE": str(hosts)}
    command = [str(BIN / "horovodrun"), "-np", "2", "--min-np", "1", "--max-np", "2",
               "--host-discovery-script", str(REPO / "launch" / "discover_hosts.sh"),
               "--gloo-timeout-seconds", "60", "--start-timeout", "120",
               sys.executable, "-m", "hvdbert.pretrain", "--elastic", "--recipe", str(TINY), "--output", str(run_dir),
               *FAST, "--set", "train.log_every=1", "--set", f"train.max_steps={MAX_STEPS}",
               "--set", f"elastic.commit_every={COMMIT_EVERY}", "--set", "checkpoint.every_steps=1000",
               "--set", "data.record_sample_ids=true"]
    log_path = tmp_path / "elastic.log"
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while logged_steps(run_dir) < 8 and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        victim = rank_pid(run_dir, 1)
        assert victim is not None and launcher.poll() is None, log_path.read_text()[-3000:]
        killed_after = logged_steps(run_dir)
        os.kill(victim, signal.SIGKILL)
        try:
            status = launcher.wait(timeout=300)
        except subprocess.TimeoutExpired:  # the survivor hangs: make it say where
            survivor = rank_pid(run_dir, 0)
            if survivor is not None:
                os.kill(survivor, STACKS_SIGNAL)
                time.sleep(2)
            pytest.fail("the survivor did not finish in 300 s after rank 1 was killed:\n"
                        + log_path.read_text()[-8000:])
        assert status == 0, log_path.read_text()[-4000:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    output = log_path.read_text()
    assert "elastic reset: now 1 workers, accumulation 2" in output

    records = read_metrics(run_dir)
    final = records[-1]
    print(f"elastic: killed rank 1 after {killed_after} logged steps; final step {final['step']}, "
          f"samples seen {final['samples_seen']}, loss {final['loss']:.4f}")
    assert final["step"] == MAX_STEPS and final["samples_seen"] == MAX_STEPS * GLOBAL_BATCH
    assert math.isfinite(final["loss"]) and final["loss"] < records[0]["loss"]
    assert records[0]["workers"] == 2 and final["workers"] == 1
    assert final["accumulation_steps"] == 2 and final["global_batch_size"] == GLOBAL_BATCH
    # Steps after the last commit before the failure are redone on the survivor, from the committed
    # position: the final record of each step count shows the global batch kept throughout.
    last_by_step = {r["step"]: r for r in records}
    assert sorted(last_by_step) == list(range(1, MAX_STEPS + 1))
    assert all(r["samples_seen"] == r["step"] * GLOBAL_BATCH for r in last_by_step.values())
    state = json.loads((run_dir / "checkpoints" / f"step-{MAX_STEPS}" / "state.json").read_text())
    assert state["world_size"] == 1 and state["samples_seen"] == MAX_STEPS * GLOBAL_BATCH
    # The sample-id logs hold the committed history: the redone steps' reads replace the lost ones,
    # and each step read the samples of its global positions, none twice in an epoch.
    from hvdbert.data.shards import PreparedData

    redone = len(records) - len(last_by_step)
    resolved = json.loads((run_dir / "recipe.json").read_text())
    per_step = committed_sample_ids(run_dir, MAX_STEPS)
    per_epoch = assert_each_sample_once_per_epoch(per_step, uninterrupted_sample_ids(
        len(PreparedData(Path(resolved["data_dir"]))), resolved["train"]["seed"], GLOBAL_BATCH, MAX_STEPS))
    print(f"elastic: {redone} steps logged twice (redone after the rollback); sample ids read per epoch {per_epoch}")


def test_elastic_outside_an_elastic_launch_is_refused(tmp_path, cli):
    result = cli("hvdbert.pretrain", ["--elastic", "--recipe", TINY, "--output", tmp_path / "run", *FAST])
    assert result.returncode == 2 and "--elastic needs Horovod elastic" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_an_elastic_launch_without_elastic_is_refused(tmp_path, hvdbert_env):
    # horovodrun's elastic driver marks its workers with HOROVOD_ELASTIC=1; a worker so started
    # without --elastic would train outside the elastic loop, so it stops before Horovod starts.
    result = run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(tmp_path / "run"), *FAST],
                        {**hvdbert_env, "HOROVOD_ELASTIC": "1"}, check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "without --elastic: add --elastic" in last, result.stderr
    assert not (tmp_path / "run").exists()


class WorkerLost(Exception):
    """What Horovod elastic raises in the survivors when a worker is lost."""


class OneRollback:
    """hvd.elastic's contract in one process (dist.HorovodDistributed.elastic_run): `commit()` records
    the counters; a lost worker (here: right after the checkpoint `lost_after` is written, before the
    next commit) sends them back to the last commit, `on_reset` runs, and fn runs again. The model is
    not rolled back: the redone steps' weights differ from the lost ones', as after a real reset the
    survivors' sums (another worker count) do."""

    def __init__(self, lost_after: Path):
        from hvdbert.dist import SingleProcess

        self.dist = type("ElasticSingleProcess", (SingleProcess,), {"elastic": True, "barrier": self.barrier})()
        self.lost_after, self.lost = lost_after, False
        self.dist.elastic_run = self.elastic_run

    def barrier(self, bounded: bool = True) -> None:  # the checkpointer's wait for rank 0's save
        if not self.lost and self.lost_after.is_dir():
            self.lost = True
            self.lost_checkpoint = (self.lost_after / "state.json").read_text()
            raise WorkerLost()

    def elastic_run(self, fn, state_objects: dict, on_reset, before_sync=None):
        class State(types.SimpleNamespace):
            def commit(self) -> None:
                self.committed = (self.step, self.samples_seen, self.started)

        state = State(**state_objects)
        while True:
            if before_sync is not None:
                before_sync()
            try:
                return fn(state)
            except WorkerLost:
                state.step, state.samples_seen, state.started = state.committed
                on_reset()


def test_a_checkpoint_after_the_last_commit_goes_with_the_rollback(tmp_path, cli, held_out_data, monkeypatch):
    """commit_every = 4 does not divide checkpoint.every_steps = 3: the checkpoint of step 6 is written
    after the commit of step 4. A worker lost then rolls the job back to step 4, and the redone step 6
    must write its own checkpoint: the lost one has the same step and position, so it would pass for
    the redone one (and `--resume auto` would continue the lost history)."""
    import hvdbert.pretrain

    run_dir = tmp_path / "run"
    rollback = OneRollback(run_dir / "checkpoints" / "step-6")
    monkeypatch.setattr(hvdbert.pretrain, "elastic_launch", lambda: True)
    monkeypatch.setattr(hvdbert.pretrain, "init_distributed", lambda cfg: rollback.dist)
    result = cli("hvdbert.pretrain", ["--elastic", "--recipe", TINY, "--data", held_out_data, "--output", run_dir,
                                      *FAST, "--set", "train.max_steps=8", "--set", "train.log_every=1",
                                      "--set", "elastic.commit_every=4", "--set", "checkpoint.every_steps=3",
                                      "--set", "checkpoint.keep=10"])
    assert result.returncode == 0 and rollback.lost, result.stderr[-3000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # 5 and 6 redone
    assert (run_dir / "checkpoints" / "step-6" / "state.json").read_text() != rollback.lost_checkpoint


def test_the_first_elastic_workers_run_the_pre_flight(tmp_path, cli, held_out_data, monkeypatch):
    """Under elastic the pre-flight cannot run before Horovod starts (a worker that joins later would
    find the run directory in use by its own job): the job's first workers run it in their start."""
    import hvdbert.pretrain

    never = OneRollback(tmp_path / "never")  # no worker is lost
    monkeypatch.setattr(hvdbert.pretrain, "elastic_launch", lambda: True)
    monkeypatch.setattr(hvdbert.pretrain, "init_distributed", lambda cfg: never.dist)
    a_file = tmp_path / "a-file"
    a_file.write_text("kept\n")
    result = cli("hvdbert.pretrain", ["--elastic", "--recipe", TINY, "--data", held_out_data, "--output", a_file,
                                      *FAST, "--set", "train.max_steps=2"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "is a file, not a directory" in lines[-1], result.stderr[-2000:]
    assert a_file.read_text() == "kept\n"
