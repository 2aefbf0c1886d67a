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
