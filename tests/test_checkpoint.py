"""Checkpoint files: round trip, atomicity and pruning, damaged and malicious checkpoints, bad input."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, SHORT, TINY, read_metrics
from hvdbert import checkpoint
from hvdbert.checkpoint import Checkpointer, CorruptCheckpoint, open_checkpoint
from hvdbert.config import load_recipe
from hvdbert.dist import SingleProcess
from hvdbert.model import PretrainingForward, build_model
from hvdbert.optim import build_optimizer, init_state
from hvdbert.plan import make_plan
from hvdbert.run import Run
from hvdbert.runlock import LOCK_FILE
from hvdbert.state import Precision, TrainState

SMALL = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
         "intermediate_size": 32, "max_position_embeddings": 32}


def small_training(seed: int):
    recipe = load_recipe(TINY)
    recipe.model = dict(SMALL)
    plan = make_plan(recipe, 1)
    torch.manual_seed(seed)
    model = build_model(recipe.model, with_nsp=False)
    optimizer = build_optimizer(model, recipe.optim, plan)
    init_state(optimizer, recipe.optim.name)
    return recipe, plan, model, optimizer


def take_step(model, optimizer) -> None:
    ids = torch.randint(5, 64, (2, 16))
    out = model(input_ids=ids)
    out.prediction_logits.float().logsumexp(-1).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def checkpointer_for(run_dir: Path, recipe, plan, model, optimizer, keep=3) -> Checkpointer:
    recipe.checkpoint.every_steps, recipe.checkpoint.keep = 2, keep
    resolved = {**recipe.to_dict(), "plan": plan.to_dict(), "data_dir": "", "with_nsp": False,
                "tokenizer_sha256": "t" * 64}
    run = Run(recipe=recipe, dist=SingleProcess(), device=torch.device("cpu"), data=None, plan=plan, model=model,
              forward=PretrainingForward(model), optimizer=optimizer,
              precision=Precision("fp32", torch.device("cpu")), state=TrainState())
    return Checkpointer(run, run_dir, resolved)


def test_round_trip_restores_weights_optimizer_and_counters(tmp_path):
    recipe, plan, model, optimizer = small_training(seed=1)
    for _ in range(3):
        take_step(model, optimizer)
    path = checkpointer_for(tmp_path, recipe, plan, model, optimizer).save(TrainState(step=3, samples_seen=96))

    _, _, other, other_optimizer = small_training(seed=2)  # different random weights
    assert not torch.equal(other.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)
    found = open_checkpoint(path)
    checkpoint.restore_training(found, other, other_optimizer, scaler=None)
    for (name, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    # the decoder stays tied to the word embeddings after loading (stored once in safetensors)
    assert other.cls.predictions.decoder.weight.data_ptr() == other.bert.embeddings.word_embeddings.weight.data_ptr()
    for p, q in zip(optimizer.param_groups[0]["params"], other_optimizer.param_groups[0]["params"]):
        assert torch.equal(optimizer.state[p]["exp_avg"], other_optimizer.state[q]["exp_avg"])
        assert float(other_optimizer.state[q]["step"]) == 3.0
    assert found.state["step"] == 3 and found.state["samples_seen"] == 96 and found.state["world_size"] == 1
    assert found.recipe["model"] == SMALL
    # and the restored optimizer continues exactly like the original
    torch.manual_seed(7)
    take_step(model, optimizer)
    torch.manual_seed(7)
    take_step(other, other_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))


def test_keep_prunes_old_checkpoints_and_partials_are_never_picked(tmp_path, caplog):
    recipe, plan, model, optimizer = small_training(seed=1)
    saver = checkpointer_for(tmp_path, recipe, plan, model, optimizer, keep=2)
    for step in (2, 4, 6):
        saver.save(TrainState(step=step, samples_seen=32 * step))
    assert [s for s, _ in checkpoint.step_dirs(tmp_path)] == [4, 6]
    root = tmp_path / "checkpoints"
    # a writer killed mid-write leaves only a hidden partial directory; a half-copied step dir has no state.json
    (root / ".step-8.partial-123").mkdir()
    shutil.copytree(root / "step-6", root / "step-10")
    (root / "step-10" / "state.json").unlink()
    # a damaged copy: right name, truncated weights
    shutil.copytree(root / "step-6", root / "step-12")
    weights = root / "step-12" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="hvdbert"):
        found = checkpoint.latest_checkpoint(tmp_path)
    assert found.step == 6
    assert "step-12" in caplog.text and "damaged" in caplog.text and "step-10" in caplog.text


class Payload:
    """Unpickling this runs code: it touches a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_malicious_pickle(checkpoint_dir: Path, marker: Path) -> None:
    """Replace training.pt with a pickle that would run code, and fix the sha256 in state.json so
    the checksum cannot be what stops it."""
    target = checkpoint_dir / "training.pt"
    # protocol 2, the one torch.load's legacy format writes: another one only adds torch's warning about it
    target.write_bytes(pickle.dumps({"optimizer": Payload(marker)}, protocol=2))
    state = json.loads((checkpoint_dir / "state.json").read_text())
    state["files"]["training.pt"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (checkpoint_dir / "state.json").write_text(json.dumps(state))


def test_malicious_pickle_is_refused_without_running_it(tmp_path):
    recipe, plan, model, optimizer = small_training(seed=1)
    path = checkpointer_for(tmp_path, recipe, plan, model, optimizer).save(TrainState(step=2, samples_seen=64))
    marker = tmp_path / "pwned"
    plant_malicious_pickle(path, marker)
    pickle.loads(pickle.dumps(Payload(tmp_path / "proof"), protocol=2))  # the payload is live: plain pickle runs it
    assert (tmp_path / "proof").exists()
    found = open_checkpoint(path)  # checksums agree
    with pytest.raises(CorruptCheckpoint, match="refused"):
        found.training()
    with pytest.raises(CorruptCheckpoint):
        checkpoint.restore_training(found, model, optimizer, scaler=None)
    assert not marker.exists()


def test_position_embeddings_extend_for_phase_two():
    _, _, short, _ = small_training(seed=1)
    long_fields = {**SMALL, "max_position_embeddings": 64}
    torch.manual_seed(3)
    long = build_model(long_fields, with_nsp=False)
    fresh_rows = long.bert.embeddings.position_embeddings.weight[32:].clone()
    checkpoint.load_weights(long, checkpoint.model_weights(short), Path("phase1"), extend_positions=True)
    positions = long.bert.embeddings.position_embeddings.weight
    assert torch.equal(positions[:32], short.bert.embeddings.position_embeddings.weight)
    assert torch.equal(positions[32:], fresh_rows)  # new positions keep their fresh initialisation
    assert torch.equal(long.bert.encoder.layer[0].output.dense.weight, short.bert.encoder.layer[0].output.dense.weight)
    with pytest.raises(Exception, match="position_embeddings"):
        checkpoint.load_weights(long, checkpoint.model_weights(short), Path("phase1"), extend_positions=False)


# ------------------------------------------------------------------------------------------------
# Bad input through the command line: one line, exit status 2, nothing overwritten

def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run, but the lock file (which names whoever opened the run last)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def refused(run_dir: Path, cli, extra: list[str], expect: str) -> None:
    before = snapshot(run_dir)
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", run_dir, *SHORT, *extra])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("hvdbert.pretrain: error: ") and expect in lines[-1], lines[-3:]
    assert "Traceback" not in result.stderr
    assert snapshot(run_dir) == before  # nothing written, nothing damaged


def test_bad_resume_input_exits_2_and_overwrites_nothing(finished_run, cli, tmp_path):
    assert [r["step"] for r in read_metrics(finished_run)] == [1, 2, 3, 4]
    refused(finished_run, cli, [], "already holds a run")
    refused(finished_run, cli, ["--resume", str(tmp_path / "no-such-checkpoint")], "does not exist")
    refused(finished_run, cli, ["--resume", "auto", "--set", "model.hidden_size=64",
                                        "--set", "model.intermediate_size=256"],
            "model.hidden_size = 128 there, 64 here")
    data_dir = json.loads((finished_run / "recipe.json").read_text())["data_dir"]  # no new corpus to prepare
    refused(finished_run, cli, ["--resume", "auto", "--data", data_dir, "--set", "model.vocab_size=4100"],
            "model.vocab_size = 4096 there, 4100 here")
    fresh = tmp_path / "phase2"
    fresh.mkdir()
    refused(fresh, cli, ["--set", f"checkpoint.init_from={tmp_path / 'missing-phase1'}"], "does not exist")
    assert not (fresh / "metrics.jsonl").exists()


def test_a_refused_checkpoint_leaves_no_run_directory_and_no_lock(finished_run, cli, tmp_path):
    """The checkpoint is checked under the run directory's lock; when it does not fit, what taking the
    lock created (the directory, its parents, the lock file) goes again."""
    step4 = finished_run / "checkpoints" / "step-4"
    new = tmp_path / "new" / "run"
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", new, *SHORT, "--resume", step4,
                                      "--set", "model.hidden_size=64", "--set", "model.intermediate_size=256"])
    assert result.returncode == 2 and "model.hidden_size = 128 there, 64 here" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "phase2"  # made by hand beforehand: it stays, empty
    empty.mkdir()
    data_dir = json.loads((finished_run / "recipe.json").read_text())["data_dir"]
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", empty, *SHORT, "--data", data_dir,
                                      "--set", f"checkpoint.init_from={step4}", "--set", "model.vocab_size=4100"])
    assert result.returncode == 2 and "model.vocab_size = 4096 there, 4100 here" in result.stderr, result.stderr
    assert list(empty.iterdir()) == []


def test_malicious_checkpoint_is_refused_by_resume(finished_run, cli, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    marker = tmp_path / "pwned"
    plant_malicious_pickle(run_dir / "checkpoints" / "step-4", marker)
    refused(run_dir, cli, ["--resume", str(run_dir / "checkpoints" / "step-4")], "refused")
    assert not marker.exists()
    # --resume auto skips it with a warning and takes the previous complete checkpoint
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", run_dir, *SHORT, "--resume", "auto"])
    assert result.returncode == 0, result.stderr
    assert "skipping checkpoint" in result.stderr and "resumed from" in result.stderr and "step-2" in result.stderr
    assert not marker.exists()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    reference = read_metrics(finished_run)
    assert abs(read_metrics(run_dir)[-1]["loss"] - reference[-1]["loss"]) <= 1e-6


def test_phase_two_starts_from_phase_one_weights_only(finished_run, cli, tmp_path):
    """checkpoint.init_from: weights (position embeddings grown 128 -> 256), fresh optimizer and schedule."""
    phase1 = finished_run / "checkpoints" / "step-4"
    run_dir = tmp_path / "phase2"
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", run_dir, *FAST,
                                      "--set", f"checkpoint.init_from={phase1}",
                                      "--set", "model.max_position_embeddings=256",
                                      "--set", "train.max_steps=2", "--set", "train.log_every=1"])
    assert result.returncode == 0, result.stderr
    assert f"weights from {phase1}" in result.stderr
    phase1_records, records = read_metrics(finished_run), read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["lr"] == phase1_records[0]["lr"]  # the schedule starts over (warmup step 1)
    # it starts where phase 1 ended, not from random weights (8.33 at step 1 of a fresh model)
    assert records[0]["loss"] < phase1_records[0]["loss"] - 0.1, (records[0]["loss"], phase1_records[0]["loss"])
    final = open_checkpoint(run_dir / "checkpoints" / "step-2")
    assert final.weights()[checkpoint.POSITION_EMBEDDINGS].shape == (256, 128)
    optimizer_steps = {float(s["step"]) for s in final.training()["optimizer"]["state"].values()}
    assert optimizer_steps == {2.0}  # a fresh optimizer: 2 steps, not 4 + 2
    assert final.state["step"] == 2 and final.state["samples_seen"] == 64


# ------------------------------------------------------------------------------------------------
# Never lose a step, never mix two histories, one writer per run directory


def resume(run_dir: Path, cli, *extra: str):
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", run_dir, *SHORT, *extra])
    assert result.returncode == 0, result.stderr
    return result


def test_a_damaged_last_checkpoint_is_replaced_by_the_resumed_run(finished_run, cli, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    last = run_dir / "checkpoints" / "step-4"
    os.truncate(last / "model.safetensors", 1000)
    result = resume(run_dir, cli, "--resume", "auto")
    assert "skipping checkpoint" in result.stderr and "resumed from" in result.stderr
    assert f"checkpoint {last} (" in result.stderr  # written again, not kept as it was
    saved = open_checkpoint(last)  # verifies every sha256
    assert saved.step == 4
    original = open_checkpoint(finished_run / "checkpoints" / "step-4").weights()
    assert all(torch.equal(original[name], tensor) for name, tensor in saved.weights().items())
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_resuming_an_earlier_checkpoint_drops_the_later_history(finished_run, cli, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    old_step_4 = open_checkpoint(run_dir / "checkpoints" / "step-4").state
    result = resume(run_dir, cli, "--resume", str(run_dir / "checkpoints" / "step-2"),
                    "--set", "optim.lr=0.001", "--set", "train.max_steps=3")
    assert "removing" in result.stderr and "step-4" in result.stderr
    # step-4 belonged to the old history (lr 0.01): it must not outlive the resume beside step-3
    assert [s for s, _ in checkpoint.step_dirs(run_dir)] == [2, 3]
    assert open_checkpoint(run_dir / "checkpoints" / "step-3").recipe["optim"]["lr"] == 0.001
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    assert old_step_4["step"] == 4
    # a later --resume auto continues the new history, not the old one
    result = resume(run_dir, cli, "--resume", "auto", "--set", "optim.lr=0.001")
    assert "step-3" in result.stderr.split("resumed from", 1)[1].splitlines()[0]
    assert open_checkpoint(run_dir / "checkpoints" / "step-4").recipe["optim"]["lr"] == 0.001


def test_resume_auto_refuses_when_no_checkpoint_can_be_loaded(finished_run, cli, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for _, path in checkpoint.step_dirs(run_dir):
        os.truncate(path / "model.safetensors", 1000)
    refused(run_dir, cli, ["--resume", "auto"], "none of the 2 checkpoint(s)")
    assert len(read_metrics(run_dir)) == 4  # the history is kept, not restarted from scratch


def test_prune_leaves_a_live_writers_partial_directory_alone(tmp_path):
    recipe, plan, model, optimizer = small_training(seed=1)
    saver = checkpointer_for(tmp_path, recipe, plan, model, optimizer, keep=2)
    root = tmp_path / "checkpoints"
    root.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    try:
        at_work = root / f".step-5.partial-{host}-{live.pid}"  # another run, still writing
        leftover = root / f".step-5.partial-{host}-{dead.pid}"  # a writer killed half-way
        elsewhere = root / f".step-5.partial-other-host-{dead.pid}"  # cannot be told from here
        for path in (at_work, leftover, elsewhere):
            path.mkdir()
        saver.save(TrainState(step=2, samples_seen=64))
        assert at_work.is_dir() and elsewhere.is_dir() and not leftover.exists()
    finally:
        live.kill()
        live.wait()
    saver.save(TrainState(step=4, samples_seen=128))
    assert not at_work.exists()  # its writer is gone now


def test_the_run_that_holds_the_lock_prunes_other_hosts_partial_directories(finished_run, cli, tmp_path):
    """Only the run holding RUN_DIR/lock writes checkpoints there, so a scratch directory of another
    host (its writer lost with its host, or an elastic job's previous rank 0) has no writer at work."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    leftovers = [run_dir / "checkpoints" / f".step-{n}.{kind}-other-host-4242" for n, kind in ((5, "partial"),
                                                                                                (4, "replaced"))]
    for path in leftovers:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    resume(run_dir, cli, "--resume", "auto", "--set", "train.max_steps=6")
    assert [s for s, _ in checkpoint.step_dirs(run_dir)] == [2, 4, 6]
    assert not any(path.exists() for path in leftovers)


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, hvdbert_env, cli):
    run_dir = tmp_path / "run"
    args = ["--recipe", str(TINY), "--output", str(run_dir), *FAST, "--set", "train.max_steps=100000",
            "--set", "train.log_every=1", "--set", "checkpoint.every_steps=5"]
    first = subprocess.Popen([sys.executable, "-m", "hvdbert.pretrain", *args, "--resume", "auto"], cwd=REPO,
                             env=hvdbert_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "metrics.jsonl").is_file() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.1)
        assert (run_dir / "metrics.jsonl").is_file()
        second = cli("hvdbert.pretrain", [*args, "--resume", "auto"])
        assert second.returncode == 2, second.stderr[-2000:]
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith("hvdbert.pretrain: error: ") and "is in use by another run" in line
        assert f"pid {first.pid} on {socket.gethostname()}" in line and "Traceback" not in second.stderr
        first.send_signal(subprocess.signal.SIGTERM)  # a checkpoint, then exit 0
        assert first.wait(timeout=300) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    steps = [r["step"] for r in read_metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: every step once
    resume_result = cli("hvdbert.pretrain", [*args, "--resume", "auto", "--set", f"train.max_steps={steps[-1] + 1}"])
    assert resume_result.returncode == 0, resume_result.stderr
    assert "resumed from" in resume_result.stderr  # the lock went with the process that held it


def test_a_checkpoint_pruned_while_read_gives_way_to_the_newer_one(tmp_path, monkeypatch, caplog):
    """hvdbert.evaluate --run on a run still training: the writer saves step 4 and prunes step 2
    (keep = 1) while step 2's weights are being read. The newer checkpoint is taken, and the pruned
    one is not reported damaged."""
    recipe, plan, model, optimizer = small_training(seed=1)
    saver = checkpointer_for(tmp_path, recipe, plan, model, optimizer, keep=1)
    saver.save(TrainState(step=2, samples_seen=64))
    read = checkpoint.Checkpoint.weights

    def writer_prunes_meanwhile(found):
        if found.step == 2:
            take_step(model, optimizer)
            saver.save(TrainState(step=4, samples_seen=128))
        return read(found)

    monkeypatch.setattr(checkpoint.Checkpoint, "weights", writer_prunes_meanwhile)
    with caplog.at_level(logging.WARNING, logger="hvdbert"):
        found, weights = checkpoint.checkpoint_and_weights(tmp_path, None)
    assert found.step == 4 and [p.name for _, p in checkpoint.step_dirs(tmp_path)] == ["step-4"]
    for name, tensor in checkpoint.model_weights(model).items():
        assert torch.equal(weights[name], tensor), name
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []  # nothing "damaged"


def test_a_lock_wait_says_whom_it_waits_for_and_takes_the_lock_once_released(tmp_path, caplog):
    """An elastic job's new rank 0 waits (elastic.lock_wait_seconds) for its predecessor's lock: it
    says whom it waits for, takes the lock when released, and refuses naming the wait when not."""
    import threading

    from hvdbert.errors import UsageError
    from hvdbert.runlock import lock_run_dir

    predecessor = lock_run_dir(tmp_path / "run")
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    with pytest.raises(UsageError, match=r"in use by another run \(" + holder + r".*\) after waiting 0.3 s "
                                         r"\(elastic.lock_wait_seconds\)"):
        lock_run_dir(tmp_path / "run", wait_seconds=0.3)
    release = threading.Timer(0.5, predecessor.release)
    release.start()
    with caplog.at_level(logging.WARNING, logger="hvdbert"):
        successor = lock_run_dir(tmp_path / "run", wait_seconds=60)
    release.join()
    said = [record.getMessage() for record in caplog.records]
    assert any(f"run/lock is held by {holder}" in line and "waiting up to 60 s" in line for line in said), said
    assert any("released after" in line for line in said), said
    assert successor.exclusive
    successor.release()
