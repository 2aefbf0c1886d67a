"""Preparing under mpirun and reading under horovodrun: the same data, each sequence once per epoch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_main, run_module

from hvdbert.data.loader import permute
from hvdbert.data.shards import Manifest

PREPARE = ["--input", "builtin", "--builtin-max-documents", "400", "--seq-len", "64",
           "--documents-per-shard", "60"]


@pytest.fixture
def tokenizer_dir(held_out_data) -> Path:
    return held_out_data / "tokenizer"


def shard_digests(directory: Path) -> list[tuple[str, int, str]]:
    manifest = Manifest.read(directory)
    return [(s["file"], s["num_sequences"], s["sha256"]) for s in manifest.shards]


@pytest.mark.multiprocess
def test_mpirun_bad_input_fails_on_every_rank_and_writes_nothing(tmp_path, hvdbert_env):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    result = run_module("hvdbert.prepare", ["--input", str(tmp_path / "a.jsonl"), "--vocab-size", "100",
                                            "--output", str(tmp_path / "out")], hvdbert_env, np=2,
                        launcher="mpirun", timeout=120, check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "hvdbert.prepare: error:" in line]
    assert len(errors) == 1 and "a.jsonl:2: no field 'text'" in errors[0]  # said once, by rank 0
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


@pytest.mark.multiprocess
def test_horovodrun_reads_every_sequence_once_per_epoch(tmp_path, hvdbert_env, tokenizer_dir):
    data = tmp_path / "data"
    assert run_main("hvdbert.prepare", [*PREPARE, "--builtin-max-documents", "120", "--tokenizer", tokenizer_dir,
                                        "--output", data]) == 0
    n = Manifest.read(data).num_sequences
    steps = n // 32 + 2  # one epoch and a bit of the next, 32 sequences a step
    run_dir = tmp_path / "run"
    run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--data", str(data), "--output", str(run_dir),
                                    "--set", "train.progress_bar=false", "--set", f"train.max_steps={steps}",
                                    "--set", "data.record_sample_ids=true", "--set", "train.log_every=5",
                                    "--set", "batch.micro_batch_size=16"],
               hvdbert_env, np=2, launcher="gloo", timeout=180)
    logs = [[list(map(int, line.split())) for line in (run_dir / "sample_ids" / f"rank-{r}.txt").read_text().splitlines()]
            for r in range(2)]
    assert [len(log) for log in logs] == [steps, steps]
    # micro-batch of rank r in the step at position s covers positions s + r x 16 ... (accumulation 1)
    by_position = [i for step in range(steps) for r in range(2) for i in logs[r][step]]
    assert len(by_position) == steps * 32
    assert sorted(by_position[:n]) == list(range(n))  # every sequence exactly once in epoch 0
    for step in range(steps):
        assert not set(logs[0][step]) & set(logs[1][step])  # the ranks read disjoint parts
    # and the order is the documented one: sample permute(p mod N) at position p, epoch p // N
    positions = np.arange(len(by_position))
    expected = np.where(positions < n, permute(positions % n, n, 42, 0), permute(positions % n, n, 42, 1))
    assert by_position == expected.tolist()


def test_pretrain_refuses_data_that_does_not_match_the_recipe(tmp_path, cli, tokenizer_dir):
    from hvdbert.config import load_recipe
    from hvdbert.dist import SingleProcess
    from hvdbert.errors import UsageError
    from hvdbert.run import open_data

    data = tmp_path / "data"
    assert cli("hvdbert.prepare", [*PREPARE, "--builtin-max-documents", "80", "--tokenizer", tokenizer_dir,
                                   "--output", data]).returncode == 0
    assert len(open_data(data, load_recipe(TINY), SingleProcess())) == Manifest.read(data).num_sequences
    cases = [
        ("data.max_seq_len=32", "prepared with sequence length 64"),
        ("data.format=nsp", "prepared in format mlm"),
        ("model.vocab_size=1000", "model.vocab_size to at least"),  # the tokenizer has 1500
    ]
    for override, message in cases:
        with pytest.raises(UsageError, match=message):
            open_data(data, load_recipe(TINY, [override]), SingleProcess())
    # through the command: exit status 2, one line, no run written
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--data", data, "--set", "data.format=nsp",
                                      "--output", tmp_path / "run"])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "prepared in format mlm" in lines[0], lines
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # a tokenizer swapped after preparation is not the one the sequences were made with
    vocab = data / "tokenizer" / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(UsageError, match="is not the one the data was prepared with"):
        open_data(data, load_recipe(TINY), SingleProcess())
