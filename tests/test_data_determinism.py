"""Preparation is a function of the command and the input: byte-identical tokenizer, shards, held-out
split and manifests run to run, in processes with other hash seeds, and for any K ranks x N processes."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

from hvdbert.data.corpus import builtin_documents
from hvdbert.data.shards import Manifest, PreparedData
from hvdbert.data.split import is_held_out

ARGS = ["--input", "builtin", "--builtin-max-documents", "400", "--vocab-size", "1200", "--seq-len", "64",
        "--documents-per-shard", "150", "--validation-fraction", "0.1"]


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def prepare(output: Path, env: dict[str, str], hash_seed: str, launcher: list[str] = (), extra=()) -> None:
    env = dict(env, PYTHONHASHSEED=hash_seed)
    command = [*launcher, sys.executable, "-m", "hvdbert.prepare", *ARGS, *extra, "--output", str(output)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.multiprocess
def test_prepare_gives_the_same_bytes_whoever_prepares(tmp_path, hvdbert_env):
    prepare(tmp_path / "first", hvdbert_env, "1")
    prepare(tmp_path / "again", hvdbert_env, "2")
    prepare(tmp_path / "two-processes", hvdbert_env, "3", extra=["--num-proc", "2"])
    prepare(tmp_path / "two-ranks", hvdbert_env, "4",
            launcher=["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2"])
    reference = tree_digest(tmp_path / "first")
    assert {"tokenizer/tokenizer.json", "manifest.json", "token_counts.npy"} <= set(reference)
    assert len([name for name in reference if name.startswith("shard-")]) >= 2  # several blocks of documents
    for name in ("again", "two-processes", "two-ranks"):
        assert tree_digest(tmp_path / name) == reference, name
    # the vocabulary is full and BERT's five tokens (only they) are special, at ids 0-4
    tokenizer = json.loads((tmp_path / "first" / "tokenizer" / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == 1200
    assert [(t["id"], t["content"]) for t in tokenizer["added_tokens"]] == list(
        enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))

    # The held-out split is by document, made at preparation (so the same for every preparer above).
    first = tmp_path / "first"
    assert any(name.startswith("validation/shard-") for name in reference)
    train, held = Manifest.read(first), Manifest.read(first / "validation")
    assert train.validation_dir == "validation" and train.validation_fraction == 0.1
    assert train.num_documents + held.num_documents == 400  # every document on exactly one side
    assert 0 < held.num_documents < 400 * 0.25
    assert held.tokenizer_sha256 == train.tokenizer_sha256
    assert len(PreparedData(first / "validation")) == held.num_sequences
    # the token counts (the unigram baseline's) are the training sequences', never the held-out ones'
    training = PreparedData(first)
    counts = np.bincount(training.get(np.arange(len(training)))["input_ids"].ravel(), minlength=train.vocab_size)
    assert np.array_equal(training.token_counts(), counts) and counts.sum() == train.num_sequences * train.seq_len
    assert held.token_counts_sha256 == "" and not (first / "validation" / "token_counts.npy").exists()
    # the held-out documents are those the content hash picks, whatever their position
    assert sum(is_held_out(d, 0.1) for d in builtin_documents(400)) == held.num_documents
