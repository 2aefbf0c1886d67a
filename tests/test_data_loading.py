"""Load-time masking and the sample stream: rates, determinism, epochs, resume, nsp batches."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import FAST, TINY
from hvdbert.data.loader import BatchStream, StreamLayout, permute
from hvdbert.data.masking import IGNORE_INDEX, MaskingRule, mask_tokens
from hvdbert.data.shards import PreparedData
from hvdbert.errors import UsageError
from hvdbert.prepare import main as prepare_main

SPECIAL = (0, 2, 3)  # pad, cls, sep
MASK_ID, VOCAB = 4, 1000


def rule(max_predictions: int = 20, whole_word: bool = False) -> MaskingRule:
    return MaskingRule(0.15, max_predictions, MASK_ID, VOCAB, SPECIAL, whole_word=whole_word)


def token_rows(n: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    ids = rng.integers(10, VOCAB, size=(n, width))
    ids[:, 0], ids[:, -1] = 2, 3
    return ids


def test_mask_rates_80_10_10_and_budget():
    ids = token_rows(4000, 128)
    out = mask_tokens(ids, np.arange(4000), epoch=0, seed=1, rule=rule(20))
    valid = out["masked_labels"] != IGNORE_INDEX
    # 15% of the 126 non-special tokens, rounded: 19 per row, under the cap of 20
    assert (valid.sum(axis=1) == 19).all()
    rows = np.repeat(np.arange(4000)[:, None], 20, axis=1)[valid]
    positions = out["masked_positions"][valid]
    assert not np.isin(positions, (0, 127)).any()  # never [CLS] or [SEP]
    assert (out["masked_labels"][valid] == ids[rows, positions]).all()
    replaced = out["input_ids"][rows, positions]
    mask_share = (replaced == MASK_ID).mean()
    kept_share = (replaced == ids[rows, positions]).mean()
    # 80% [MASK]; 10% kept, plus the random draws that happen to hit the original token
    assert abs(mask_share - 0.8) < 0.01 and abs(kept_share - 0.1) < 0.01
    untouched = np.ones_like(ids, dtype=bool)
    untouched[rows, positions] = False
    assert (out["input_ids"][untouched] == ids[untouched]).all()
    # at 512 the cap binds: 80 predictions (Devlin et al. 2018)
    long = mask_tokens(token_rows(10, 512), np.arange(10), 0, 1, rule(80))
    assert ((long["masked_labels"] != IGNORE_INDEX).sum(axis=1) == 76).all()
    capped = mask_tokens(token_rows(10, 512), np.arange(10), 0, 1, rule(40))
    assert ((capped["masked_labels"] != IGNORE_INDEX).sum(axis=1) == 40).all()


def test_masks_depend_only_on_seed_epoch_and_sample():
    ids = token_rows(64, 128)
    samples = np.arange(1000, 1064)
    first = mask_tokens(ids, samples, epoch=2, seed=7, rule=rule())
    # the same samples in another order and another batch split: the same masks per sample
    order = np.random.default_rng(1).permutation(64)
    again = {k: np.concatenate([v1, v2]) for (k, v1), v2 in zip(
        mask_tokens(ids[order[:20]], samples[order[:20]], 2, 7, rule()).items(),
        mask_tokens(ids[order[20:]], samples[order[20:]], 2, 7, rule()).values())}
    for name in first:
        assert np.array_equal(first[name][order], again[name])
    other_epoch = mask_tokens(ids, samples, epoch=3, seed=7, rule=rule())
    assert (other_epoch["masked_positions"] != first["masked_positions"]).any(axis=1).mean() > 0.95


def test_whole_word_masking_takes_every_piece_and_respects_the_budget():
    ids = token_rows(500, 128)
    rng = np.random.default_rng(2)
    word_starts = rng.random(ids.shape) < 0.4  # words of 1 to several pieces
    word_starts[:, 0] = word_starts[:, 1] = word_starts[:, -1] = True
    out = mask_tokens(ids, np.arange(500), 0, 5, rule(20, whole_word=True), word_starts=word_starts)
    counts = (out["masked_labels"] != IGNORE_INDEX).sum(axis=1)
    assert counts.max() <= 19 and counts.mean() > 17  # round(0.15 x 126), whole words that fit
    word_id = np.cumsum(word_starts, axis=1)
    for r in range(500):
        masked = out["masked_positions"][r][out["masked_labels"][r] != IGNORE_INDEX]
        for word in np.unique(word_id[r, masked]):
            assert set(np.flatnonzero(word_id[r] == word)) <= set(masked.tolist())


def prepare_builtin_data(tmp_path_factory, name: str, *options: str) -> Path:
    """The embedded corpus prepared (in this process) with `options` into a fresh directory."""
    out = tmp_path_factory.mktemp(name) / "data"
    assert prepare_main(["--input", "builtin", *options, "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def nsp_data(tmp_path_factory) -> Path:
    return prepare_builtin_data(tmp_path_factory, "nsp", "--builtin-max-documents", "150", "--vocab-size", "800",
                                "--seq-len", "64", "--format", "nsp")


def open_stream(data: PreparedData, layout: StreamLayout, start: int = 0, seed: int = 11,
                whole_word: bool = False) -> BatchStream:
    special = data.manifest.special_token_ids
    masking = MaskingRule(0.15, 10, special["mask"], data.manifest.vocab_size,
                          (special["pad"], special["cls"], special["sep"]), whole_word=whole_word)
    return BatchStream(data, layout, masking, seed, start, prefetch_batches=2)


def test_nsp_batches_carry_the_pair_inputs(nsp_data):
    data = PreparedData(nsp_data)
    # the shards are read where they lie (memory-mapped), never copied whole into memory
    assert all(not column.flags.owndata and not column.flags.writeable
               for columns in data._columns for column in columns.values())
    stream = open_stream(data, StreamLayout(1, 0, 16, 1), whole_word=True)
    try:
        (batch,) = stream.next_step()
    finally:
        stream.close()
    assert set(batch) == {"input_ids", "token_type_ids", "next_sentence_label", "attention_mask",
                          "masked_positions", "masked_labels", "sample_ids"}
    raw = data.get(batch["sample_ids"].numpy())
    pad = data.manifest.special_token_ids["pad"]
    assert np.array_equal(batch["attention_mask"].numpy(), (raw["input_ids"] != pad).astype(np.int64))
    assert np.array_equal(batch["token_type_ids"].numpy(), raw["token_type_ids"])
    assert np.array_equal(batch["next_sentence_label"].numpy(), raw["next_sentence_label"])
    masked = batch["masked_positions"].numpy()[batch["masked_labels"].numpy() != IGNORE_INDEX]
    assert batch["attention_mask"].numpy()[np.nonzero(batch["masked_labels"].numpy() != IGNORE_INDEX)[0],
                                           masked].all()  # never a padding position


def test_every_sample_once_per_epoch_and_resume_is_immediate(nsp_data):
    data = PreparedData(nsp_data)
    n = len(data)
    for epoch in range(3):
        order = permute(np.arange(n), n, seed=11, epoch=epoch)
        assert sorted(order.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(n), n, 11, 0), permute(np.arange(n), n, 11, 1))

    # two workers, accumulation 2: a step's four micro-batches are the global positions in order
    layouts = [StreamLayout(2, r, 4, 2) for r in range(2)]
    streams = [open_stream(data, layout) for layout in layouts]
    try:
        steps = (n + 15) // 16 + 1
        seen = [[] for _ in range(steps)]
        for step in range(steps):
            for stream in streams:
                seen[step].append([b["sample_ids"].numpy() for b in stream.next_step()])
        by_position = np.concatenate([np.concatenate([seen[s][r][a] for a in range(2) for r in range(2)])
                                      for s in range(steps)])
        # micro-batch a of rank r covers positions s + (a x 2 + r) x 4: reassembled, epoch 0 is a permutation
        assert sorted(by_position[:n].tolist()) == list(range(n))
        assert np.array_equal(by_position[:n], permute(np.arange(n), n, 11, 0))
        assert np.array_equal(by_position[n:], permute(np.arange(len(by_position) - n), n, 11, 1))  # epoch 1
        # resume at step 3 (position 48) on one worker with the same global batch: the same samples, masks
        resumed = open_stream(data, StreamLayout(1, 0, 8, 2), start=48)
        try:
            first = resumed.next_step()
        finally:
            resumed.close()
        uninterrupted = streams[0].batch_at(np.arange(48, 64))
        joined = {k: np.concatenate([b[k].numpy() for b in first]) for k in first[0]}
        for name in ("sample_ids", "input_ids", "masked_positions", "masked_labels"):
            assert np.array_equal(joined[name], uninterrupted[name].numpy()), name
    finally:
        for stream in streams:
            stream.close()
    # a position far into training (epoch ~10^9) costs what position 0 costs: no scan
    start = time.perf_counter()
    far = streams[0].batch_at(np.arange(10**12, 10**12 + 16))
    assert time.perf_counter() - start < 1.0
    assert len(set(far["sample_ids"].tolist())) == 16


# ------------------------------------------------------------------------------------------------
# Damaged shards: one line naming the shard, never a traceback or silent training


@pytest.fixture(scope="module")
def mlm_data(tmp_path_factory) -> Path:
    return prepare_builtin_data(tmp_path_factory, "mlm", "--builtin-max-documents", "300", "--vocab-size", "1000",
                                "--seq-len", "64", "--documents-per-shard", "100")


def damaged_copy(source: Path, target: Path, how: str) -> Path:
    """A copy of prepared data with shard-00001 truncated, or 400 bytes in its middle overwritten
    with token ids outside (0xFF) or inside (id 7) the vocabulary; the file keeps its size then."""
    import shutil

    shutil.copytree(source, target)
    shard = target / "shard-00001.arrow"
    size = shard.stat().st_size
    if how == "truncated":
        os.truncate(shard, size // 2)
        return shard
    middle = (size // 2) & ~7  # Arrow buffers are 8-byte aligned: whole uint16 ids
    with open(shard, "r+b") as f:
        f.seek(middle)
        f.write(b"\xff" * 400 if how == "out-of-vocabulary" else b"\x07\x00" * 200)
    assert shard.stat().st_size == size
    return shard


def test_a_truncated_shard_is_refused_when_opened(mlm_data, tmp_path):
    shard = damaged_copy(mlm_data, tmp_path / "data", "truncated")
    with pytest.raises(UsageError, match=f"{shard} is damaged .truncated or overwritten."):
        PreparedData(tmp_path / "data")


def test_out_of_vocabulary_ids_stop_at_the_first_read(mlm_data, tmp_path):
    shard = damaged_copy(mlm_data, tmp_path / "data", "out-of-vocabulary")
    data = PreparedData(tmp_path / "data")
    with pytest.raises(UsageError, match=f"{shard} is damaged: it holds token id 65535, outside the vocabulary"):
        data.get(np.arange(len(data)))


def test_damage_inside_the_vocabulary_is_found_by_the_sha256_check(mlm_data, tmp_path):
    shard = damaged_copy(mlm_data, tmp_path / "data", "inside-vocabulary")
    data = PreparedData(tmp_path / "data")
    first = data.manifest.shards[0]["num_sequences"]
    data.get(np.arange(first))  # shard 0 only: intact
    data.verifier.wait()
    data.get(np.arange(first, first + 4))  # reads shard 1, whose ids all look valid, and starts its check
    with pytest.raises(UsageError, match=f"{shard} is damaged: its sha256 .* differs from manifest.json's"):
        data.verifier.wait()
    with pytest.raises(UsageError, match="shard-00001.arrow is damaged"):
        data.get(np.arange(4))  # every later read stops too


def test_a_shard_is_verified_by_one_rank_of_many(mlm_data):
    data = PreparedData(mlm_data)
    data.share_verification(1, 2)
    data.get(np.arange(len(data)))
    data.verifier.wait()
    assert data.verifier._requested == {i for i in range(len(data.manifest.shards)) if i % 2 == 1}


@pytest.mark.parametrize("how, expected", [("truncated", "is damaged (truncated or overwritten)"),
                                           ("inside-vocabulary", "is damaged: its sha256")])
def test_pretrain_stops_with_one_line_naming_the_damaged_shard(mlm_data, tmp_path, cli, how, expected):
    shard = damaged_copy(mlm_data, tmp_path / "data", how)
    run_dir = tmp_path / "run"
    # 300 steps would finish with exit status 0 if the damage went unnoticed
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--data", tmp_path / "data", "--output", run_dir, *FAST,
                                      "--set", "train.max_steps=300"])
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"hvdbert.pretrain: error: {shard} {expected}"), line
    assert "Traceback" not in result.stderr
