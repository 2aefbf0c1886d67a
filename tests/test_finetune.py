"""The downstream probe: fine-tune a pretrained run end to end, and refuse bad task files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_module

from hvdbert.config import FinetuneConfig
from hvdbert.finetune import Example, builtin_examples, few_per_class, file_examples, probe_trainer, split_by_document


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


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies a model directory's own code (trust_remote_code) here, not to ~/.cache."""
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))


def test_finetune_a_run_end_to_end(tmp_path, hvdbert_env, task, cli, modules_cache):
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
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "pretrained"), trust_remote_code=True).eval()
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
        (no_weights, two_each, f"--model {no_weights}: cannot load its weights", []),
        (no_weights, two_each, "--pooling max: choose one of mean, cls", ["--pooling", "max"]),
        (no_weights, two_each, "--encoder-lr 0.0: must be greater than 0", ["--encoder-lr", "0"])]
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


def test_the_probe_pools_the_mean_and_cuts_at_the_pretraining_length(finished_run, task, cli, tmp_path,
                                                                      modules_cache):
    """finished_run pretrained on 64-token sequences with masked LM alone (tiny recipe)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "probe"
    result = cli("hvdbert.finetune", ["--model", finished_run, "--task", task, "--output", out, "--epochs", "1",
                                      "--train-per-class", "4", "--seed", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "config.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert saved["classifier_pooling"] == "mean" and saved["pretraining_max_seq_len"] == 64
    assert saved["auto_map"] == {"AutoModelForSequenceClassification": "bert_pooled.BertMeanPooledForSequenceClassification"}
    defaults = FinetuneConfig()
    assert (results["pooling"], results["max_length"]) == ("mean", 64)  # not the default 128: positions past 64 are untrained
    assert (results["lr"], results["encoder_lr"]) == (defaults.lr, defaults.encoder_lr)

    # transformers loads it with the code saved beside it, and it classifies the tokens' mean
    model = AutoModelForSequenceClassification.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(model).__name__ == "BertMeanPooledForSequenceClassification" and model.config.classifier_pooling == "mean"
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    batch = tokenizer(["Stop the event loop.", "Parse a message from a string of headers and a body."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.bert(**batch).last_hidden_state
        first = hidden[0, : int(batch["attention_mask"][0].sum())].mean(0)  # its non-padding tokens
        assert torch.allclose(model(**batch).logits[0], model.classifier(first), atol=1e-5)

    # a longer --max-length than the pretraining's is refused, in one line, before anything is written
    status, err = cli("hvdbert.finetune", ["--model", finished_run, "--task", task, "--output", tmp_path / "long",
                                           "--max-length", "65"]).exit_and_stderr_lines()
    assert status == 2 and err == [
        f"hvdbert.finetune: error: --max-length 65: more than the 64 tokens it was pretrained on by --model "
        f"{finished_run}, so positions past 64 are untrained; give at most 64, or leave it out"], err
    assert not (tmp_path / "long").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".finetune-")]


def test_encoder_and_head_learn_at_their_own_rates(tmp_path):
    from transformers import BertConfig, ModernBertConfig, ModernBertForSequenceClassification, TrainingArguments

    from hvdbert.families.bert_pooled import BertMeanPooledForSequenceClassification

    shape = dict(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                 num_labels=3)
    models = [BertMeanPooledForSequenceClassification(BertConfig(**shape)),
              ModernBertForSequenceClassification(ModernBertConfig(**shape, classifier_pooling="mean", pad_token_id=0,
                                                                   bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                                                   sep_token_id=2))]
    for model in models:
        args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.01, warmup_steps=0.1,
                                 report_to=[], use_cpu=True)
        trainer = probe_trainer(model=model, args=args, encoder_lr=1e-4)
        trainer.create_optimizer_and_scheduler(num_training_steps=10)
        group_of = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
        assert len(group_of) == len(list(model.parameters()))  # every parameter, once
        for name, parameter in model.named_parameters():
            encoder = name.startswith(model.base_model_prefix + ".")  # model.bert / model.model: what pretraining gave
            group = group_of[id(parameter)]
            assert (group["name"], group["initial_lr"]) == (("encoder", 1e-4) if encoder else ("head", 1e-3)), name
            no_decay = name.endswith("bias") or "norm" in name.lower()
            assert group["weight_decay"] == (0.0 if no_decay else 0.01), name
        for _ in range(5):  # the schedule (warmup, linear decay) keeps the ratio
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        rates = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
        assert rates["encoder"] == pytest.approx(rates["head"] / 10) and 0 < rates["head"] < 1e-3


def test_the_probe_table_names_its_models_and_reads_back_only_their_own_results(finished_run, tmp_path, cli):
    """A kept result of this model is read back; one of another model under the same name is run again;
    the table names each model as --model NAME=DIR does."""
    workdir = tmp_path / "runs" / "demo"
    workdir.mkdir(parents=True)
    kept = {"task": "builtin", "model": str(finished_run), "dev_accuracy": 0.999, "dev_macro_f1": 0.5,
            "dev_examples": 215, "dev_majority_accuracy": 0.2047, "lr": 1e-3, "encoder_lr": 1e-4, "pooling": "mean"}
    (workdir / "few-shot-scratch-seed1.json").write_text(json.dumps(kept))
    (workdir / "few-shot-pretrained-seed1.json").write_text(json.dumps({**kept, "model": str(tmp_path / "other")}))
    result = cli("bench.probe_table", ["--model", f"demo={finished_run}", "--output", tmp_path, "--seeds", "1",
                                      "--settings", "few-shot", "--few-shot-per-class", "1", "--few-shot-epochs", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r["init"]: r for r in json.loads((tmp_path / "probe.json").read_text())["runs"]}
    assert runs["scratch"]["dev_accuracy"] == 0.999 and runs["scratch"]["model_dir"] == str(finished_run)
    assert runs["pretrained"]["model_dir"] == str(finished_run) and runs["pretrained"]["dev_accuracy"] != 0.999
    assert runs["pretrained"]["train_examples"] == 8  # run again, one example of each class
    assert "| demo | few-shot |" in (tmp_path / "probe.md").read_text()


def test_the_probe_table_states_each_seed_the_means_and_whether_the_gap_beats_the_spread():
    from bench.probe_table import summary, table

    def run(setting, init, seed, accuracy):
        return {"model": "demo", "setting": setting, "init": init, "seed": seed, "dev_accuracy": accuracy,
                "dev_examples": 215, "dev_majority_accuracy": 0.2047, "lr": 1e-3, "encoder_lr": 1e-4, "pooling": "mean"}

    rows = [run("defaults", "pretrained", s, a) for s, a in ((1, 0.50), (2, 0.54), (3, 0.52))]
    rows += [run("defaults", "scratch", s, a) for s, a in ((1, 0.30), (2, 0.36), (3, 0.33))]
    rows += [run("few-shot", "pretrained", s, a) for s, a in ((1, 0.40), (2, 0.44), (3, 0.42))]
    rows += [run("few-shot", "scratch", s, a) for s, a in ((1, 0.35), (2, 0.41), (3, 0.38))]
    defaults, few = summary(rows)
    assert defaults["pretrained"]["per_seed"] == [0.50, 0.54, 0.52] and defaults["scratch"]["mean"] == pytest.approx(0.33)
    assert defaults["gap"] == pytest.approx(0.19) and defaults["spread"] == pytest.approx(0.06) and defaults["beats_spread"]
    assert few["gap"] == pytest.approx(0.04) and few["spread"] == pytest.approx(0.06) and not few["beats_spread"]
    text = table([defaults, few], rows, "python -m bench.probe_table --model demo=runs/demo --output out")
    assert "| demo | defaults | 0.5200 (0.5000-0.5400) | 0.3300 (0.3000-0.3600) | +0.1900 | 0.0600 | yes | " \
           "0.0001, 0.0001 | 0.5000, 0.5400, 0.5200 | 0.3000, 0.3600, 0.3300 |" in text
    assert "encoder lr 0.0001," in text
    assert "| demo | few-shot | 0.4200 (0.4000-0.4400) | 0.3800 (0.3500-0.4100) | +0.0400 | 0.0600 | no |" in text


def test_the_probe_table_reports_each_init_at_its_own_best_encoder_rate(cli, tmp_path):
    """--encoder-lrs: every seed at every rate; pretrained and from scratch each at the rate whose
    mean is best (a young encoder and a random one want different rates), the chosen rates shown."""
    from bench.probe_table import summary, table

    def run(init, rate, seed, accuracy):
        return {"model": "demo", "setting": "defaults", "init": init, "seed": seed, "dev_accuracy": accuracy,
                "dev_examples": 215, "dev_majority_accuracy": 0.2047, "lr": 1e-3, "encoder_lr": rate, "pooling": "mean"}

    rows = [run("pretrained", 1e-4, s, a) for s, a in ((1, 0.60), (2, 0.62), (3, 0.61))]
    rows += [run("pretrained", 1e-3, s, a) for s, a in ((1, 0.70), (2, 0.74), (3, 0.72))]
    rows += [run("scratch", 1e-4, s, a) for s, a in ((1, 0.66), (2, 0.64), (3, 0.65))]
    rows += [run("scratch", 1e-3, s, a) for s, a in ((1, 0.50), (2, 0.70), (3, 0.51))]  # mean 0.57
    (line,) = summary(rows)
    assert line["pretrained"]["encoder_lr"] == 1e-3 and line["pretrained"]["per_seed"] == [0.70, 0.74, 0.72]
    assert line["scratch"]["encoder_lr"] == 1e-4 and line["scratch"]["mean"] == pytest.approx(0.65)
    assert line["scratch"]["mean_by_rate"] == {"0.0001": pytest.approx(0.65), "0.001": pytest.approx(0.57)}
    assert line["gap"] == pytest.approx(0.07) and line["spread"] == pytest.approx(0.04) and line["beats_spread"]
    text = table([line], rows, "python -m bench.probe_table --model demo=runs/demo --output out --encoder-lrs 1e-4,1e-3")
    assert "encoder lr swept over 0.0001, 0.001" in text
    assert "| +0.0700 | 0.0400 | yes | 0.001, 0.0001 | 0.7000, 0.7400, 0.7200 | 0.6600, 0.6400, 0.6500 |" in text
    for bad in ("1e-4,abc", "1e-4,1e-4", "0,1e-3"):
        result = cli("bench.probe_table", ["--model", f"demo={tmp_path}", "--output", tmp_path / "out", "--encoder-lrs", bad])
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "give distinct positive rates" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_layer_probe_pools_each_layer_and_fits_a_linear_classifier(finished_run, tmp_path, cli):
    """bench.probe_layers: per layer the mean over the non-padding tokens (padding does not move it),
    then [CLS]; its classifier separates what is separable; bad input is one line, exit 2."""
    import torch
    from transformers import AutoModelForMaskedLM

    from bench.probe_layers import features, linear_probe
    from hvdbert.data.tokenizer import load_any_tokenizer
    from hvdbert.finetune import resolve_model

    args = type("Args", (), {"model": finished_run, "max_length": None})
    model_dir, max_length = resolve_model(args, tmp_path)
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()
    tokenizer = load_any_tokenizer(model_dir, "")
    short, long = "Stop the event loop.", "Parse a message from a string of headers and a body, then return it."
    both, alone = features(model, tokenizer, [short, long], max_length), features(model, tokenizer, [short], max_length)
    layers = model.config.num_hidden_layers
    assert max_length == 64 and both.shape == (layers + 2, 2, model.config.hidden_size)
    torch.testing.assert_close(both[:, 0], alone[:, 0], atol=1e-5, rtol=1e-4)  # padded beside the longer one
    assert not torch.allclose(both[0, 0], both[-1, 0])  # the embeddings' mean is not [CLS]'s output

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 3
    points = torch.randn(60, 8, generator=generator) + 6 * torch.nn.functional.one_hot(labels, 8)
    assert linear_probe(points[:30], labels[:30], points[30:], labels[30:], 3) == 1.0

    for bad, says in ((["--model", tmp_path / "nowhere"], "neither a transformers model directory"),
                      (["--model", finished_run, "--random-seeds", "one"], "--random-seeds 'one': expected"),
                      (["--model", finished_run, "--train-per-class", "0"], "--train-per-class 0: expected")):
        status, err = cli("bench.probe_layers", bad).exit_and_stderr_lines()
        assert status == 2 and len(err) == 1 and err[0].startswith("bench.probe_layers: error: ") and says in err[0]
