"""Shared test helpers: run hvdbert commands as real processes, plain or under horovodrun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = REPO / "recipes" / "tiny.toml"

# Small and deterministic: a short run of the tiny recipe on part of the embedded corpus.
FAST = ["--set", "train.progress_bar=false", "--set", "data.builtin_max_documents=1500"]


@pytest.fixture(scope="session")
def hvdbert_env(tmp_path_factory) -> dict[str, str]:
    """Environment for child processes: a test-session cache so the suite never reads ~/.cache."""
    env = dict(os.environ)
    env["HVDBERT_CACHE"] = str(tmp_path_factory.mktemp("hvdbert-cache"))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("HOROVOD_RANK", None)
    return env


@pytest.fixture
def cli(monkeypatch, capsys, hvdbert_env):
    """Call a command's `main(argv)` in this process, as a plain process outside any launcher runs it:
    `cli(main, *args)` returns its exit status and its stderr lines. Refusals are tested this way; a
    real process is spent only where a process boundary is under test."""
    for name in list(os.environ):
        if name.startswith(("HOROVOD_", "OMPI_", "PMI_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HVDBERT_CACHE", hvdbert_env["HVDBERT_CACHE"])

    def call(main, *args) -> tuple[int, list[str]]:
        capsys.readouterr()
        status = main([str(arg) for arg in args])
        return status, capsys.readouterr().err.strip().splitlines()

    return call


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
