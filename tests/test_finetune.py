"""The downstream probe: fine-tune a pretrained run end to end, and refuse bad task files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_module

from hvdbert.finetune import Example, builtin_examples, few_per_class, file_examples, split_by_document


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """A small JSON-lines task of real labelled text: 3 classes of the embedded task."""
    rows = [e for e in builtin_examples() if e.label in ("asyncio", "email", "logging")]
    picked = []
    for label in ("asyncio", "email", "logging"):
        picked += [e for e in rows if e.label == label][:30]
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in picked))
    return path


def test_finetune_a_run_end_to_end(tmp_path, hvdbert_env, task, cli):
    data = tmp_path / "data"
    run_module("hvdbert.prepare", ["--input", "builtin", "--builtin-max-documents", "80", "--seq-len", "64",
                                   "--vocab-size", "600", "--output", str(data)], hvdbert_env, timeout=300)
    run_dir = tmp_path / "run"
    run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--data", str(data), "--output", str(run_dir),
                                    "--set", "train.progress_bar=false", "--set", "train.max_steps=2"],
               hvdbert_env, timeout=300)
    results = {}
    for name, extra in (("pretrained", []), ("scratch", ["--from-scratch", "--train-per-class", "5"])):
        out = tmp_path / name
        result = run_module("hvdbert.finetune", ["--model", str(run_dir), "--task", str(task), "--output", str(out),
                                                 "--json", str(tmp_path / f"{name}.json"), "--epochs", "1",
                                                 "--max-length", "64", *extra], hvdbert_env, timeout=400)
        assert "dev accuracy" in result.stdout
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert results[name] == json.loads((out / "results.json").read_text())
    pretrained = results["pretrained"]
    assert pretrained["classes"] == 3 and pretrained["train_examples"] + pretrained["dev_examples"] == 90
    assert results["scratch"]["from_scratch"] and not pretrained["from_scratch"]
    assert results["scratch"]["train_examples"] == 15 and results["scratch"]["dev_examples"] == pretrained["dev_examples"]
    # the saved model is the one scored: predicting dev again gives the reported accuracy
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    examples = [Example(r["text"], r["label"], f"{task}:{n}")
                for n, r in enumerate(map(json.loads, task.read_text().splitlines()), start=1)]
    _, dev = split_by_document(examples, 0.2, 0)
    assert len(dev) == pretrained["dev_examples"]
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "pretrained")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "pretrained"))
    with torch.no_grad():
        batch = tokenizer([e.text for e in dev], truncation=True, max_length=64, padding=True, return_tensors="pt")
        predicted = model(**batch).logits.argmax(-1).numpy()
    truth = np.array([pretrained["labels"].index(e.label) for e in dev])
    assert float((predicted == truth).mean()) == pytest.approx(pretrained["dev_accuracy"])

    # the run's data lost its tokenizer: finetune, which has no --tokenizer, says how to give one
    (data / "tokenizer").rename(data / "moved")
    status, err = cli("hvdbert.finetune", ["--model", run_dir, "--task", task,
                                           "--output", tmp_path / "again"]).exit_and_stderr_lines()
    assert status == 2 and err == [
        f"hvdbert.finetune: error: tokenizer not found in {data / 'tokenizer'} (the run's DATA_DIR/tokenizer); "
        f"export the run with `python -m hvdbert.export --run {run_dir} --tokenizer DIR --output HF_DIR` and pass "
        "--model HF_DIR"], err


def test_few_per_class_draws_a_seeded_subset_of_each_class():
    train, _ = split_by_document(builtin_examples(), 0.2, 0)
    few = few_per_class(train, 16, seed=0)
    counts = {label: sum(e.label == label for e in few) for label in {e.label for e in train}}
    assert set(counts.values()) == {16} and len(few) == 16 * len(counts)
    positions = [train.index(e) for e in few]
    assert positions == sorted(positions)  # a subset, in the task's order
    assert few_per_class(train, 16, seed=0) == few and few_per_class(train, 16, seed=1) != few
    assert len(few_per_class(train, 10_000, seed=0)) == len(train)  # a class with fewer keeps all of them


def test_bad_task_files_are_one_line_and_write_nothing(tmp_path, cli):
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "a b c", "label": "x"}\n{"text": "d e f", "label": "y"}\n{"text": "g h"}\n')
    single = tmp_path / "single.csv"
    single.write_text("text,label\nsome words,x\nmore words,x\n")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("text,label\nsome words,x\ncaf\u00e9 words,y\n".encode("latin-1"))
    one_each = tmp_path / "one-each.csv"  # every class one document: nothing left to score on
    one_each.write_text("text,label\nsome words,x\nmore words,y\nother words,z\n")
    two_each = tmp_path / "two-each.csv"
    two_each.write_text("text,label\nsome words,x\nmore words,x\nother words,y\nlast words,y\n")
    no_tokenizer = tmp_path / "no-tokenizer"  # a model directory holding config.json alone
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 50, "hidden_size": 8,
                                                          "num_hidden_layers": 1, "num_attention_heads": 1,
                                                          "intermediate_size": 8}))
    no_weights = tmp_path / "no-weights"  # config.json and a tokenizer, no weights
    no_weights.mkdir()
    (no_weights / "config.json").write_text((no_tokenizer / "config.json").read_text())
    (no_weights / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "some", "words"]))
    cases = [(missing, "missing.jsonl:3: no field 'label'", []), (single, "at least 2 classes", []),
             (missing, "--train-per-class -1: must be 0", ["--train-per-class", "-1"]),
             (latin1, "latin1.csv:3: not UTF-8 text (byte 0xe9 at offset 27); save the task file as UTF-8", []),
             (one_each, "one-each.csv: the dev part is empty: each class has a single document (3 examples, "
                        "3 classes); give at least 2 examples of some class", [])]
    cases = [(tmp_path, *case) for case in cases] + [
        (no_tokenizer, two_each, f"{no_tokenizer} is not a tokenizer directory: it has neither tokenizer.json nor "
                                 "vocab.txt; a transformers model directory needs its tokenizer beside config.json", []),
        (no_weights, two_each, f"--model {no_weights}: cannot load its weights", [])]
    for model, path, message, extra in cases:
        out = tmp_path / "out"
        status, err = cli("hvdbert.finetune", ["--model", model, "--task", path, "--output", out,
                          "--json", tmp_path / "r.json", *extra]).exit_and_stderr_lines()
        assert status == 2 and len(err) == 1 and message in err[0], err
        assert not out.exists() and not (tmp_path / "r.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".finetune-")] == []


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path):
    excel = tmp_path / "excel.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    excel.write_bytes(b"\xef\xbb\xbftext,label\r\nsome words,x\r\nmore words,y\r\n")
    assert file_examples(excel, "text", "label") == [Example("some words", "x", f"{excel}:2"),
                                                     Example("more words", "y", f"{excel}:3")]


def test_a_json_path_that_is_a_directory_is_refused_before_fine_tuning(tmp_path, cli):
    taken = tmp_path / "results"
    taken.mkdir()
    task = tmp_path / "task.csv"
    task.write_text("text,label\nsome words,x\nmore words,x\nother words,y\nlast words,y\n")
    status, err = cli("hvdbert.finetune", ["--model", tmp_path, "--task", task, "--output", tmp_path / "out",
                      "--json", taken]).exit_and_stderr_lines()
    assert status == 2 and err == [f"hvdbert.finetune: error: --json {taken} is a directory; name a file, "
                                   f"e.g. --json {taken / 'results.json'}"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "task.csv"]
