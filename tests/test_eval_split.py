"""The held-out split made at preparation: by document, the same for any number of preparing processes."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import run_module

from hvdbert.data.shards import Manifest, PreparedData
from hvdbert.data.split import is_held_out

PREPARE = ["--input", "builtin", "--builtin-max-documents", "300", "--seq-len", "64",
           "--documents-per-shard", "60", "--vocab-size", "1500", "--validation-fraction", "0.1"]


def digests(directory: Path) -> list[tuple[str, int, str]]:
    return [(s["file"], s["num_sequences"], s["sha256"]) for s in Manifest.read(directory).shards]


def test_split_is_the_same_for_one_and_two_preparing_ranks(tmp_path, hvdbert_env):
    run_module("hvdbert.prepare", [*PREPARE, "--output", str(tmp_path / "k1")], hvdbert_env, timeout=300)
    # the same tokenizer (a trained one may differ run to run): what is compared is the split and shards
    run_module("hvdbert.prepare", [*PREPARE, "--tokenizer", str(tmp_path / "k1" / "tokenizer"),
                                   "--output", str(tmp_path / "k2")], hvdbert_env, np=2, launcher="mpirun", timeout=300)
    for split in ("", "validation"):
        one, two = tmp_path / "k1" / split, tmp_path / "k2" / split
        assert digests(one) == digests(two) and digests(one)
        assert json.loads((one / "manifest.json").read_text()) == json.loads((two / "manifest.json").read_text())
    train, held = Manifest.read(tmp_path / "k1"), Manifest.read(tmp_path / "k1" / "validation")
    assert train.validation_dir == "validation" and train.validation_fraction == 0.1
    assert train.num_documents + held.num_documents == 300  # every document on exactly one side
    assert 0 < held.num_documents < 300 * 0.25
    assert held.tokenizer_sha256 == train.tokenizer_sha256
    assert len(PreparedData(tmp_path / "k1" / "validation")) == held.num_sequences
    # the held-out documents are those the content hash picks, whatever their position
    from hvdbert.data.corpus import builtin_documents

    assert sum(is_held_out(d, 0.1) for d in builtin_documents(300)) == held.num_documents
