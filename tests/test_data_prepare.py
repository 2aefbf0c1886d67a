"""python -m hvdbert.prepare on real inputs: every input kind, both formats, Chinese, bad input."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from hvdbert.data.shards import Manifest, PreparedData
from hvdbert.data.tokenizer import tokenizer_hash, train_wordpiece
from hvdbert.prepare import main as prepare_main

ENGLISH = [
    "The quick brown fox jumps over the lazy dog. It was not the first time.",
    "A tokenizer splits text into pieces. The pieces become ids. The ids feed the model.",
    "Horovod averages gradients across workers. Each worker reads its own part of the data.",
    "Masked language models predict hidden words from their context on both sides.",
    "Packing joins documents end to end so that no position in a sequence is padding.",
]


def english_documents(count: int) -> list[str]:
    # varied, deterministic documents of two to six sentences
    return [" ".join(ENGLISH[(i + k) % len(ENGLISH)] for k in range(2 + i % 5)) + f" Document {i}."
            for i in range(count)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tokenizer")
    train_wordpiece(english_documents(200), vocab_size=600).save_pretrained(str(directory))
    return directory


def run(argv: list[str]) -> int:
    return prepare_main([str(a) for a in argv])


def rows(directory: Path) -> dict[str, np.ndarray]:
    data = PreparedData(directory)
    return data.get(np.arange(len(data)))


def encode(tokenizer_dir: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def test_mlm_packing_is_the_documents_joined_by_sep(tmp_path, tokenizer_dir):
    documents = english_documents(120)
    (tmp_path / "corpus.txt").write_text("\n".join(documents) + "\n", encoding="utf-8")
    out = tmp_path / "data"
    assert run(["--input", tmp_path / "corpus.txt", "--output", out, "--tokenizer", tokenizer_dir,
                "--seq-len", 32, "--text-documents", "lines", "--documents-per-shard", 50]) == 0
    manifest = Manifest.read(out)
    sep, cls, pad = (manifest.special_token_ids[k] for k in ("sep", "cls", "pad"))
    assert manifest.num_documents == 120 and manifest.format == "mlm"
    assert [s["num_documents"] for s in manifest.shards] == [50, 50, 20]
    ids = rows(out)["input_ids"]
    assert ids.shape == (manifest.num_sequences, 32)
    assert (ids[:, 0] == cls).all() and (ids[:, -1] == sep).all() and not (ids == pad).any()
    assert manifest.num_tokens == ids.size
    # shard by shard: the bodies, concatenated, are the shard's documents joined by [SEP], minus a tail
    encoded = encode(tokenizer_dir, documents)
    first = 0
    total_body = 0
    for shard, begin in zip(manifest.shards, (0, 50, 100)):
        stream = [t for k, doc in enumerate(encoded[begin:begin + shard["num_documents"]])
                  for t in ([sep] if k else []) + doc]
        body = ids[first:first + shard["num_sequences"], 1:-1].reshape(-1)
        assert body.tolist() == stream[:len(body)]
        assert len(stream) - len(body) < 30  # only the incomplete last sequence is dropped
        total_body += len(stream)
        first += shard["num_sequences"]
    assert manifest.dropped_tokens == total_body - manifest.num_sequences * 30
    # the tokenizer travels with the data, and the manifest names it
    assert manifest.tokenizer_sha256 == tokenizer_hash(out / "tokenizer") == tokenizer_hash(tokenizer_dir)


def test_every_input_kind_gives_the_same_sequences(tmp_path, tokenizer_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    documents = english_documents(90)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "lines.txt").write_text("\n".join(documents) + "\n", encoding="utf-8")
    (inputs / "blank.txt").write_text("\n\n".join(d.replace(". ", ".\n") for d in documents) + "\n",
                                      encoding="utf-8")
    with open(inputs / "docs.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(documents):
            f.write(json.dumps({"id": i, "body": d}) + "\n")
    pq.write_table(pa.table({"body": documents}), inputs / "docs.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"body": documents}).save_to_disk(str(inputs / "saved"))
    extracted = inputs / "wiki" / "AA"  # WikiExtractor --json: JSON lines in files without a suffix
    extracted.mkdir(parents=True)
    for part in range(2):
        with open(extracted / f"wiki_{part:02d}", "w", encoding="utf-8") as f:
            for d in documents[part * 45:(part + 1) * 45]:
                f.write(json.dumps({"id": "1", "text": d}) + "\n")
    split = inputs / "split"
    split.mkdir()
    for part in range(3):  # a directory of files, read in sorted order
        (split / f"part-{part}.txt").write_text("\n".join(documents[part * 30:(part + 1) * 30]) + "\n")

    common = ["--tokenizer", tokenizer_dir, "--seq-len", 32]
    cases = {
        "lines": ["--input", inputs / "lines.txt", "--text-documents", "lines"],
        "jsonl": ["--input", inputs / "docs.jsonl", "--text-field", "body"],
        "parquet": ["--input", inputs / "docs.parquet", "--text-field", "body"],
        "saved": ["--input", inputs / "saved", "--text-field", "body"],
        "directory": ["--input", split, "--text-documents", "lines"],
        "glob": ["--input", str(split / "part-*.txt"), "--text-documents", "lines"],
        "wikiextractor": ["--input", str(inputs / "wiki" / "**" / "wiki_*"), "--input-format", "jsonl"],
    }
    results = {}
    for name, argv in cases.items():
        assert run([*argv, *common, "--output", tmp_path / name]) == 0, name
        assert Manifest.read(tmp_path / name).num_documents == 90, name
        results[name] = rows(tmp_path / name)["input_ids"]
    for name, ids in results.items():
        assert np.array_equal(ids, results["lines"]), name
    # blank-line separated documents (one sentence per line, BERT's own input format): same documents
    assert run(["--input", inputs / "blank.txt", *common, "--output", tmp_path / "blank"]) == 0
    assert Manifest.read(tmp_path / "blank").num_documents == 90
    assert Manifest.read(tmp_path / "blank").num_sequences == len(results["lines"])
    # builtin mixes with files: the documents of both, in order
    assert run(["--input", "builtin", inputs / "lines.txt", "--builtin-max-documents", 20,
                "--text-documents", "lines", *common, "--output", tmp_path / "mixed"]) == 0
    assert Manifest.read(tmp_path / "mixed").num_documents == 110


def test_trains_a_tokenizer_and_lowercase_option(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(english_documents(150)) + "\n", encoding="utf-8")
    for flag, expect_upper in (("--lowercase", False), ("--no-lowercase", True)):
        out = tmp_path / flag
        assert run(["--input", corpus, "--output", out, "--vocab-size", 300, "--seq-len", 32, flag]) == 0
        manifest = Manifest.read(out)
        assert manifest.lowercase is not expect_upper
        assert 100 < manifest.vocab_size <= 300
        vocab = (json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
        assert ("The" in vocab) is expect_upper and "the" in vocab


def test_nsp_pairs_phase1_and_phase2(tmp_path, tokenizer_dir):
    corpus = tmp_path / "corpus.txt"
    # documents of 10 to 40 sentences: most pairs fill the sequence; only document ends fall short
    long_documents = [" ".join(english_documents(60)[(i + k) % 60] for k in range(3 + i % 10)) for i in range(200)]
    corpus.write_text("\n".join(long_documents) + "\n", encoding="utf-8")
    for seq_len in (128, 512):  # phase 1 and phase 2: one command each
        out = tmp_path / f"nsp-{seq_len}"
        assert run(["--input", corpus, "--output", out, "--tokenizer", tokenizer_dir, "--seq-len", seq_len,
                    "--format", "nsp", "--text-documents", "lines", "--documents-per-shard", 100]) == 0
        manifest = Manifest.read(out)
        special = manifest.special_token_ids
        data = rows(out)
        ids, types, labels = data["input_ids"], data["token_type_ids"], data["next_sentence_label"]
        assert manifest.format == "nsp" and ids.shape[1] == seq_len and len(ids) > 20
        for row, row_types in zip(ids, types):
            seps = np.flatnonzero(row == special["sep"])
            assert row[0] == special["cls"] and len(seps) == 2
            a_end, b_end = seps
            assert a_end >= 2 and b_end > a_end + 1  # A and B each hold at least one token
            assert (row[b_end + 1:] == special["pad"]).all() and not (row[:b_end + 1] == special["pad"]).any()
            assert (row_types[:a_end + 1] == 0).all() and (row_types[a_end + 1:b_end + 1] == 1).all()
            assert (row_types[b_end + 1:] == 0).all()
        assert 0.4 < labels.mean() < 0.7  # half random next, plus single-sentence chunks (always random)
        assert manifest.num_tokens == int((ids != special["pad"]).sum())
        if seq_len == 128:
            lengths = (ids != special["pad"]).sum(axis=1)
            assert (lengths >= seq_len - 8).mean() > 0.5  # padded only where unavoidable
            assert 0.02 < (lengths < seq_len // 2).mean() < 0.3  # short_seq_prob 0.1 (plus document ends)


CHINESE_WORDS = [
    "我们 喜欢 自然 语言 处理 。", "机器 学习 需要 大量 数据 。", "北京 是 中国 的 首都 。",
    "今天 天气 很 好 ， 我们 去 公园 散步 。", "预训练 模型 改变 了 自然 语言 处理 。",
    "分布式 训练 让 模型 更 快 。", "每个 工作 进程 读取 自己 的 数据 。",
]


def chinese_documents(count: int, segmented: bool) -> list[str]:
    docs = [" ".join(CHINESE_WORDS[(i * 3 + k) % len(CHINESE_WORDS)] for k in range(3 + i % 4))
            for i in range(count)]
    return docs if segmented else ["".join(d.split()) for d in docs]


def test_chinese_characters_and_whole_word_masking(tmp_path):
    from hvdbert.data.loader import BatchStream, StreamLayout
    from hvdbert.data.masking import MaskingRule

    plain, segmented = tmp_path / "plain.txt", tmp_path / "segmented.txt"
    plain.write_text("\n".join(chinese_documents(300, False)) + "\n", encoding="utf-8")
    segmented.write_text("\n".join(chinese_documents(300, True)) + "\n", encoding="utf-8")
    assert run(["--input", plain, "--output", tmp_path / "plain", "--vocab-size", 500, "--seq-len", 32,
                "--text-documents", "lines"]) == 0
    tokenizer = tmp_path / "plain" / "tokenizer"
    # every CJK character is its own token, as in BERT (no "##" pieces inside Chinese words)
    from tokenizers import Tokenizer

    tokens = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).encode(
        "我们喜欢自然语言处理", add_special_tokens=False).tokens
    assert tokens == list("我们喜欢自然语言处理")
    assert run(["--input", segmented, "--output", tmp_path / "segmented", "--tokenizer", tokenizer,
                "--seq-len", 32, "--text-documents", "lines", "--word-segmented"]) == 0
    plain_rows, seg_rows = rows(tmp_path / "plain"), rows(tmp_path / "segmented")
    # the spaces of the segmentation change no token, only the word boundaries
    assert np.array_equal(plain_rows["input_ids"], seg_rows["input_ids"])
    assert "word_start" not in plain_rows and "word_start" in seg_rows
    assert Manifest.read(tmp_path / "segmented").word_segmented

    vocab = Tokenizer.from_file(str(tokenizer / "tokenizer.json")).get_vocab()
    inverse = {i: t for t, i in vocab.items()}
    # the word starts follow the segmentation: "自然" is one word of two characters
    row, starts = seg_rows["input_ids"][0], seg_rows["word_start"][0]
    words, current = [], ""
    for token_id, start in zip(row[1:-1], starts[1:-1]):
        if start and current:
            words.append(current)
            current = ""
        current += inverse[int(token_id)]
    assert {"我们", "喜欢", "自然", "语言", "处理", "机器", "学习"} & set(words)
    assert all(len(w) <= 3 for w in words)

    for name in ("segmented", "plain"):
        data = PreparedData(tmp_path / name)
        special = data.manifest.special_token_ids
        rule = MaskingRule(0.15, 5, special["mask"], data.manifest.vocab_size,
                           (special["pad"], special["cls"], special["sep"]), whole_word=True)
        stream = BatchStream(data, StreamLayout(1, 0, 64, 1), rule, seed=3, samples_seen=0, prefetch_batches=1)
        try:
            batch = stream.batch_at(np.arange(64))
        finally:
            stream.close()
        samples = batch["sample_ids"].numpy()
        if name == "segmented":
            word_start = data.get(samples)["word_start"]
        else:  # no segmentation given: each character is a word
            word_start = np.ones_like(batch["input_ids"].numpy())
        longest = 0
        for r in range(64):
            masked = set(batch["masked_positions"][r][batch["masked_labels"][r] != -100].tolist())
            assert 1 <= len(masked) <= 5
            for p in masked:  # whole words: a masked character's word-mates are masked too
                begin = p
                while begin > 1 and not word_start[r, begin]:  # [CLS] ends any word
                    begin -= 1
                end = p + 1
                while end < 31 and not word_start[r, end]:
                    end += 1
                assert set(range(begin, end)) <= masked
                longest = max(longest, end - begin)
        # several-character words are masked whole; without a segmentation every word is one character
        assert longest >= 2 if name == "segmented" else longest == 1


def read_stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def nothing_written(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.partial-*"))


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, tokenizer_dir, capsys):
    good = tmp_path / "good.txt"
    good.write_text("\n".join(english_documents(50)) + "\n", encoding="utf-8")
    common = ["--tokenizer", tokenizer_dir, "--seq-len", 32, "--output", tmp_path / "out"]

    assert run(["--input", tmp_path / "missing.txt", *common]) == 2
    assert "missing.txt" in read_stderr_line(capsys) and nothing_written(tmp_path, "out")

    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    assert run(["--input", tmp_path / "empty.txt", *common]) == 2
    assert "no text" in read_stderr_line(capsys) and nothing_written(tmp_path, "out")

    assert run(["--input", str(tmp_path / "nothing-*.txt"), *common]) == 2
    assert "matches no file" in read_stderr_line(capsys)

    lines = [json.dumps({"text": d}) for d in english_documents(5)]
    (tmp_path / "no-field.jsonl").write_text("\n".join(lines[:2] + ['{"body": "x"}'] + lines[2:]) + "\n")
    assert run(["--input", tmp_path / "no-field.jsonl", *common]) == 2
    line = read_stderr_line(capsys)
    assert "no-field.jsonl:3" in line and "'text'" in line and "body" in line
    assert nothing_written(tmp_path, "out")

    # interrupted half-way: the first file is fine and prepared, the second breaks on line 4
    (tmp_path / "broken.jsonl").write_text("\n".join(lines[:3] + ['{"text": "unterminated'] + lines[3:]) + "\n")
    assert run(["--input", good, tmp_path / "broken.jsonl", *common, "--documents-per-shard", 10]) == 2
    assert "broken.jsonl:4: not valid JSON" in read_stderr_line(capsys)
    assert nothing_written(tmp_path, "out")

    not_a_tokenizer = tmp_path / "not-a-tokenizer"
    not_a_tokenizer.mkdir()
    (not_a_tokenizer / "config.json").write_text("{}")
    assert run(["--input", good, "--tokenizer", not_a_tokenizer, "--output", tmp_path / "out"]) == 2
    assert "not a tokenizer directory" in read_stderr_line(capsys) and nothing_written(tmp_path, "out")

    assert run(["--input", good, "--format", "xlnet", *common]) == 2
    assert "--format" in read_stderr_line(capsys)

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("precious")
    assert run(["--input", good, "--tokenizer", tokenizer_dir, "--output", tmp_path / "used"]) == 2
    assert "not empty" in read_stderr_line(capsys)
    assert (tmp_path / "used" / "keep.txt").read_text() == "precious"


def test_invalid_utf8_is_replaced_counted_and_warned(tmp_path, tokenizer_dir, caplog):
    good = "\n".join(english_documents(40)).encode()
    (tmp_path / "latin1.txt").write_bytes(good + b"\ncaf\xe9 au lait, cr\xe8me br\xfbl\xe9e\nna\xefve\n")
    with caplog.at_level(logging.WARNING, logger="hvdbert.prepare"):
        assert run(["--input", tmp_path / "latin1.txt", "--tokenizer", tokenizer_dir, "--seq-len", 32,
                    "--text-documents", "lines", "--output", tmp_path / "out"]) == 0
    manifest = Manifest.read(tmp_path / "out")
    assert manifest.invalid_utf8_lines == 2 and manifest.num_documents == 42
    assert any("latin1.txt: 2 line(s)" in r.getMessage() for r in caplog.records)


def test_command_line_exit_status(tmp_path, hvdbert_env):
    from conftest import run_module

    result = run_module("hvdbert.prepare", ["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
                        hvdbert_env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"hvdbert.prepare: error: --input {tmp_path / 'nope'}: no such file or directory (give files, "
        "directories, globs, `builtin`, or hf:NAME for a hub dataset)"]


def test_hub_dataset_without_a_hub_is_a_one_line_error(tmp_path, hvdbert_env, tokenizer_dir):
    """hf:NAME goes to datasets.load_dataset(streaming=True); no hub is reachable here (offline)."""
    from conftest import run_module

    env = {**hvdbert_env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = run_module("hvdbert.prepare", ["--input", "hf:someone/some-corpus", "--tokenizer", str(tokenizer_dir),
                                            "--output", str(tmp_path / "o")], env, check=False, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "hf:someone/some-corpus: cannot open the hub dataset" in lines[0]
    assert nothing_written(tmp_path, "o")


def test_killed_prepare_leaves_nothing_that_looks_valid(tmp_path, hvdbert_env, tokenizer_dir):
    import signal
    import subprocess
    import sys
    import time

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("\n".join(english_documents(100)) + "\n") * 100, encoding="utf-8")  # 10,000 documents
    argv = [sys.executable, "-m", "hvdbert.prepare", "--input", str(corpus), "--tokenizer", str(tokenizer_dir),
            "--seq-len", "32", "--text-documents", "lines", "--documents-per-shard", "100",
            "--output", str(tmp_path / "out")]
    child = subprocess.Popen(argv, env=hvdbert_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while not list(tmp_path.glob(".out.partial-*/shard-*.arrow")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "prepare finished before it could be interrupted"
    child.send_signal(signal.SIGKILL)  # no chance to clean up
    child.wait()
    assert not (tmp_path / "out").exists()  # only a hidden .out.partial-PID, with no manifest
    assert not list(tmp_path.glob(".out.partial-*/manifest.json"))
    # the same command again completes, and the leftover does not get in its way
    subprocess.run(argv[:-1] + [str(tmp_path / "out")], env=hvdbert_env, check=True, capture_output=True,
                   timeout=300)
    assert Manifest.read(tmp_path / "out").num_documents == 10_000


def test_publish_refuses_a_directory_another_process_filled(tmp_path):
    from hvdbert.data.shards import publish_directory
    from hvdbert.errors import UsageError

    mine, final = tmp_path / ".out.partial-1", tmp_path / "out"
    mine.mkdir()
    (mine / "manifest.json").write_text("mine")
    final.mkdir()
    (final / "manifest.json").write_text("theirs")  # a concurrent preparer published first
    with pytest.raises(UsageError, match="was filled by another process"):
        publish_directory(mine, final)
    assert (final / "manifest.json").read_text() == "theirs"
    empty = tmp_path / "empty"
    empty.mkdir()
    publish_directory(mine, empty)  # an empty output directory is replaced
    assert (empty / "manifest.json").read_text() == "mine" and not mine.exists()


def test_more_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, tokenizer_dir, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.txt"
    good.write_text("\n".join(english_documents(50)) + "\n", encoding="utf-8")
    out = ["--output", tmp_path / "out"]
    common = ["--tokenizer", tokenizer_dir, "--seq-len", 32, *out]

    # a vocabulary too large to train (the trainer aborted the process), or smaller than the alphabet
    assert run(["--input", good, "--vocab-size", 10_000_000_000, *out]) == 2
    assert "--vocab-size 10000000000: at most 2097152 tokens" in read_stderr_line(capsys)
    assert run(["--input", good, "--vocab-size", 5, *out]) == 2
    line = read_stderr_line(capsys)
    assert "--vocab-size 5 is too small for this corpus" in line and "choose at least" in line
    assert nothing_written(tmp_path, "out")

    # a malformed tokenizer.json given to --tokenizer
    broken = tmp_path / "broken-tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "WordPiece", "vocab": {"a": "x"}}}')
    assert run(["--input", good, "--tokenizer", broken, "--seq-len", 32, *out]) == 2
    assert f"{broken}: cannot load the tokenizer" in read_stderr_line(capsys) and nothing_written(tmp_path, "out")

    # every line in another encoding: refused, not 5,000 sequences of U+FFFD
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("\n".join(d.replace("e", "\u00e9") for d in english_documents(50)).encode("latin-1"))
    assert run(["--input", latin1, *common]) == 2
    assert "50 of its 50 lines are not UTF-8" in read_stderr_line(capsys) and nothing_written(tmp_path, "out")

    # a parquet column of numbers is named as such, not as "holds no text"
    pq.write_table(pa.table({"text": list(range(10))}), tmp_path / "numbers.parquet")
    assert run(["--input", tmp_path / "numbers.parquet", *common]) == 2
    assert "column 'text' holds int64, not text" in read_stderr_line(capsys) and nothing_written(tmp_path, "out")

    # an output that is a file, or that cannot be written
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert run(["--input", good, "--tokenizer", tokenizer_dir, "--output", a_file]) == 2
    assert "is a file, not a directory" in read_stderr_line(capsys) and a_file.read_text() == "keep me"
    assert run(["--input", good, "--tokenizer", tokenizer_dir, "--output", "/proc/hvdbert-data"]) == 2
    assert "cannot write in /proc" in read_stderr_line(capsys)
