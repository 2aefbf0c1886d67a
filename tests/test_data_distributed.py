"""Preparing under mpirun and reading under horovodrun: the same data, each sequence once per epoch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_module

from hvdbert.data.loader import permute
from hvdbert.data.shards import Manifest

PREPARE = ["--input", "builtin", "--builtin-max-documents", "400", "--seq-len", "64",
           "--documents-per-shard", "60"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, hvdbert_env) -> Path:
    out = tmp_path_factory.mktemp("tok") / "data"
    run_module("hvdbert.prepare", [*PREPARE, "--vocab-size", "2000", "--output", str(out)], hvdbert_env)
    return out / "tokenizer"


def shard_digests(directory: Path) -> list[tuple[str, int, str]]:
    manifest = Manifest.read(directory)
    return [(s["file"], s["num_sequences"], s["sha256"]) for s in manifest.shards]


def test_same_shards_whatever_the_number_of_workers(tmp_path, hvdbert_env, tokenizer_dir):
    common = [*PREPARE, "--tokenizer", str(tokenizer_dir)]
    run_module("hvdbert.prepare", [*common, "--output", str(tmp_path / "k1")], hvdbert_env)
    run_module("hvdbert.prepare", [*common, "--output", str(tmp_path / "k2")], hvdbert_env, np=2,
               launcher="mpirun", timeout=120)
    run_module("hvdbert.prepare", [*common, "--num-proc", "2", "--output", str(tmp_path / "p2")], hvdbert_env,
               timeout=120)
    one = shard_digests(tmp_path / "k1")
    assert len(one) == 7  # 400 documents in blocks of 60
    assert shard_digests(tmp_path / "k2") == one
    assert shard_digests(tmp_path / "p2") == one
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("k1", "k2", "p2")]
    assert manifests[0] == manifests[1] == manifests[2]
    assert manifests[0]["num_documents"] == 400
    assert sum(s["num_documents"] for s in manifests[0]["shards"]) == 400
    assert not list(tmp_path.glob(".*partial*"))


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


def test_horovodrun_reads_every_sequence_once_per_epoch(tmp_path, hvdbert_env, tokenizer_dir):
    data = tmp_path / "data"
    run_module("hvdbert.prepare", [*PREPARE, "--builtin-max-documents", "120", "--tokenizer", str(tokenizer_dir),
                                   "--output", str(data)], hvdbert_env)
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


def test_pretrain_refuses_data_that_does_not_match_the_recipe(tmp_path, hvdbert_env, tokenizer_dir):
    from hvdbert.config import load_recipe
    from hvdbert.dist import SingleProcess
    from hvdbert.errors import UsageError
    from hvdbert.run import open_data

    data = tmp_path / "data"
    run_module("hvdbert.prepare", [*PREPARE, "--builtin-max-documents", "80", "--tokenizer", str(tokenizer_dir),
                                   "--output", str(data)], hvdbert_env)
    assert len(open_data(data, load_recipe(TINY), SingleProcess())) == Manifest.read(data).num_sequences
    cases = [
        ("data.max_seq_len=32", "prepared with sequence length 64"),
        ("data.format=nsp", "prepared in format mlm"),
        ("model.vocab_size=1000", "model.vocab_size to at least"),
    ]
    for override, message in cases:
        with pytest.raises(UsageError, match=message):
            open_data(data, load_recipe(TINY, [override]), SingleProcess())
    # through the command: exit status 2, one line, no run written
    result = run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--data", str(data), "--set", "data.format=nsp",
                                             "--output", str(tmp_path / "run")], hvdbert_env, check=False,
                        timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "prepared in format mlm" in lines[0], lines
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # a tokenizer swapped after preparation is not the one the sequences were made with
    vocab = data / "tokenizer" / "tokenizer.json"
    vocab.write_text(vocab.read_text().replace('"[UNK]"', '"[UNKNOWN]"', 1))
    with pytest.raises(UsageError, match="is not the one the data was prepared with"):
        open_data(data, load_recipe(TINY), SingleProcess())
