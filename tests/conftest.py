"""Shared test helpers: run hvdbert commands as real processes, plain or under horovodrun."""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "recipes" / "tiny.toml"

# Small and deterministic: a short run of the tiny recipe on part of the embedded corpus.
FAST = ["--set", "train.progress_bar=false", "--set", "data.builtin_max_documents=1500"]
# FAST for 4 steps, each logged, a checkpoint every 2: what `finished_run` trained.
SHORT = FAST + ["--set", "train.max_steps=4", "--set", "checkpoint.every_steps=2", "--set", "train.log_every=1"]
# Small prepared data with a held-out split: 300 documents of the embedded corpus, 64 tokens, 1500 ids.
HELD_OUT_PREPARE = ["--input", "builtin", "--builtin-max-documents", "300", "--seq-len", "64", "--vocab-size", "1500",
                    "--validation-fraction", "0.1"]

# The longest files, longest first (seconds of one quiet suite on 2 cores: about 540, 215, 205, 185,
# 145, 135; test_recipe_learning's fixture alone took 95-145 s in loaded ones). `make test` hands
# files to its 2 workers in collection order (--dist loadfile --no-loadscope-reorder), so these start
# first, and the short files fill in around them instead of one long file starting late while the
# other worker runs out of work.
LONGEST_FIRST = ["test_multihost.py", "test_core_distributed.py", "test_bench.py", "test_launch.py", "test_failures.py",
                 "test_resume.py", "test_recipe_learning.py"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.fixture(scope="session", autouse=True)
def hvdbert_env(tmp_path_factory) -> dict[str, str]:
    """Environment for child processes, and for commands run in this process (run_main): a
    test-session cache, so the suite never reads ~/.cache and prepares the embedded corpus once."""
    cache = str(tmp_path_factory.mktemp("hvdbert-cache"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HVDBERT_CACHE", cache)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("HOROVOD_RANK", None)
        yield env


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, hvdbert_env) -> Path:
    """A complete run of the tiny recipe (SHORT: checkpoints at steps 2 and 4), shared by the modules
    that resume, refuse, export or evaluate one. Tests copy it before they change anything."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert run_main("hvdbert.pretrain", ["--recipe", TINY, "--output", run_dir, *SHORT]) == 0
    return run_dir


@pytest.fixture(scope="session")
def nsp_run(tmp_path_factory, hvdbert_env) -> Path:
    """A complete run of the tiny recipe with next-sentence prediction (SHORT, on HELD_OUT_PREPARE's
    documents prepared as sentence pairs), evaluated at its end on their held-out split."""
    root = tmp_path_factory.mktemp("nsp")
    assert run_main("hvdbert.prepare", [*HELD_OUT_PREPARE, "--format", "nsp", "--output", root / "data"]) == 0
    assert run_main("hvdbert.pretrain", ["--recipe", TINY, "--data", root / "data", "--output", root / "run", *SHORT,
                                         "--set", "data.format=nsp", "--set", "eval.at_end=true",
                                         "--set", "eval.max_sequences=32"]) == 0
    return root / "run"


@pytest.fixture(scope="session")
def held_out_data(tmp_path_factory) -> Path:
    """HELD_OUT_PREPARE's data (DATA/validation is its held-out split), shared by the evaluation and
    benchmark modules; prepared in this process (a prepare as a real process is test_data_*'s)."""
    out = tmp_path_factory.mktemp("held-out") / "data"
    assert run_main("hvdbert.prepare", [*HELD_OUT_PREPARE, "--output", out]) == 0
    return out


def run_module(module: str, args: list[str], env: dict[str, str], np: int = 1, timeout: float = 600,
               launcher: str = "plain", check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m module args` as one plain process, or under horovodrun/mpirun with np workers."""
    command = [sys.executable, "-m", module, *args]
    if launcher == "gloo":
        command = [str(BIN / "horovodrun"), "--gloo", "-np", str(np), "-H", f"localhost:{np}", *command]
    elif launcher == "mpi":
        command = [str(BIN / "horovodrun"), "--mpi", "-np", str(np), "-H", f"localhost:{np}", *command]
    elif launcher == "mpirun":
        command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(np), *command]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}\n"
                             f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


# What a launcher sets: cleared for in-process commands, which must act as one plain process started by hand.
LAUNCHER_VARIABLES = ("HOROVOD_", "OMPI_", "PMI_", "PMIX_")


@dataclass
class Outcome:
    """What a command left: its exit status and what it printed (the fields subprocess results have)."""
    returncode: int
    stdout: str
    stderr: str

    def exit_and_stderr_lines(self) -> tuple[int, list[str]]:
        return self.returncode, self.stderr.strip().splitlines()


def run_main(module: str, args: list) -> int:
    """A command's main(argv) in this process (the module holding it: hvdbert.bench.cli for `python -m
    hvdbert.bench`), as one plain process started by hand; what it changes of the process (signal
    handlers, logging, torch's thread count) is put back. Returns its exit status."""
    import torch

    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith(LAUNCHER_VARIABLES)}
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    root = logging.getLogger()
    root_handlers, root_level = list(root.handlers), root.level
    threads = torch.get_num_threads()
    try:
        return importlib.import_module(module).main([str(a) for a in args])
    except SystemExit as exit:  # a rank that is not rank 0 leaves a refusal to rank 0 this way
        return exit.code if isinstance(exit.code, int) else 1
    finally:
        os.environ.update(saved)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        root.handlers[:] = root_handlers
        root.setLevel(root_level)
        torch.set_num_threads(threads)


def run_main_captured(module: str, args: list) -> Outcome:
    """run_main, with what the command printed on stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returncode = run_main(module, args)
    return Outcome(returncode, stdout.getvalue(), stderr.getvalue())


@pytest.fixture
def cli():
    """Commands in this process, for refusals and short single-process work, where no process boundary
    is under test, without paying a fresh interpreter's torch + transformers import (seconds per
    call): `cli("hvdbert.pretrain", [...])` returns an Outcome (run_main_captured)."""
    return run_main_captured


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def committed_sample_ids(run_dir: Path, steps: int) -> list[list[int]]:
    """Per step 1..steps, the sample ids all ranks read, from `data.record_sample_ids` logs: line k of
    RUN_DIR/sample_ids/rank-R.txt is step k + 1 (an empty or missing line: rank R did not exist then)."""
    logs = [p.read_text().split("\n") for p in sorted((run_dir / "sample_ids").glob("rank-*.txt"))]
    return [[int(i) for log in logs if k < len(log) for i in log[k].split()] for k in range(steps)]


def uninterrupted_sample_ids(samples: int, seed: int, global_batch_size: int, steps: int) -> list[dict[int, int]]:
    """Per step 1..steps, {sample id: epoch} of what any run reads there, from the global positions
    alone (docs/data.md: position p is sample permute(p mod N) of epoch p // N, N = `samples`)."""
    import numpy as np

    from hvdbert.data.loader import permute

    found = []
    for k in range(steps):
        positions = np.arange(k * global_batch_size, (k + 1) * global_batch_size)
        found.append({int(permute(np.array([p % samples]), samples, seed, int(p // samples))[0]): int(p // samples)
                      for p in positions})
    return found


def assert_each_sample_once_per_epoch(per_step: list[list[int]], expected: list[dict[int, int]]) -> dict[int, int]:
    """Every step read exactly the samples of its positions, so no sample twice in an epoch; returns
    the number of ids read per epoch."""
    per_epoch: dict[int, list[int]] = {}
    for step, (ids, wanted) in enumerate(zip(per_step, expected), start=1):
        assert sorted(ids) == sorted(wanted), f"step {step}: read {sorted(ids)}, expected {sorted(wanted)}"
        for i in ids:
            per_epoch.setdefault(wanted[i], []).append(i)
    for epoch, ids in per_epoch.items():
        assert len(set(ids)) == len(ids), f"epoch {epoch}: a sample read twice"
    return {epoch: len(ids) for epoch, ids in per_epoch.items()}


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The pid of the `hvdbert.pretrain` worker of `rank` writing run_dir (under horovodrun or mpirun), or None."""
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if "hvdbert.pretrain" in command and str(run_dir) in command and "horovodrun" not in command:
            try:
                environment = process.environ()
                if environment.get("HOROVOD_RANK", environment.get("OMPI_COMM_WORLD_RANK")) == str(rank):
                    return process.info["pid"]
            except psutil.Error:
                continue
    return None
