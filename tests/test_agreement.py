"""Ranks that would train on different things stop at start-up, together, with one line.

`mpirun`'s multiple-program form (`mpirun -np 1 CMD1 : -np 1 CMD2`) gives two ranks of one job
different command lines: different --data, a different --set, a --resume on one rank only."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import FAST, REPO, TINY, run_main

pytestmark = pytest.mark.multiprocess

PREPARE = ["--input", "builtin", "--vocab-size", "1000", "--seq-len", "64", "--documents-per-shard", "100"]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, hvdbert_env):
    root = tmp_path_factory.mktemp("agreement-data")
    for name, documents in (("d1", "300"), ("d2", "301")):
        assert run_main("hvdbert.prepare", [*PREPARE, "--builtin-max-documents", documents,
                                            "--output", root / name]) == 0
    return root / "d1", root / "d2"


def two_rank_job(first: list[str], second: list[str], env, output) -> subprocess.CompletedProcess:
    common = [sys.executable, "-m", "hvdbert.pretrain", "--recipe", str(TINY), "--output", str(output), *FAST,
              "--set", "train.max_steps=2"]
    command = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "1", *common, *first, ":",
               "-np", "1", *common, *second]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def the_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "hvdbert.pretrain: error:" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", ["data", "recipe", "resume"])
def test_ranks_that_disagree_stop_with_one_line(tmp_path, hvdbert_env, two_datasets, case):
    d1, d2 = two_datasets
    output = tmp_path / "run"
    first, second = ["--data", str(d1)], ["--data", str(d1)]
    if case == "data":
        second = ["--data", str(d2)]
    elif case == "recipe":
        second += ["--set", "optim.lr=0.02"]
    else:
        # a complete run on one data set, then a resume that only rank 0 is told about (rank 0 alone runs
        # the pre-flight, which would refuse a used run directory without --resume before any agreement)
        assert run_main("hvdbert.pretrain", ["--recipe", TINY, "--output", output, "--data", d1, *FAST,
                                             "--set", "train.max_steps=2", "--set", "checkpoint.every_steps=2"]) == 0
        first += ["--resume", "auto"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) if output.exists() else []
    result = two_rank_job(first, second, hvdbert_env, output)
    assert result.returncode == 2, result.stderr[-3000:]
    error = the_error(result)
    assert f"rank 1 (host {socket.gethostname()})" in error
    expected = {"data": ("prepared data", str(d2), str(d1)), "recipe": ("resolved recipe",),
                "resume": ("checkpoint to resume from", "step-2")}[case]
    for words in expected:
        assert words in error, error
    # nothing written: no run directory, or the earlier run's exactly as it was
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) if output.exists() else []
    assert after == before


def test_ranks_that_agree_train(tmp_path, hvdbert_env, two_datasets):
    d1, _ = two_datasets
    result = two_rank_job(["--data", str(d1)], ["--data", str(d1)], hvdbert_env, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "hvdbert: done: 2 steps" in result.stdout
