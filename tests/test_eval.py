"""Held-out evaluation: the same figure for any worker count and from a checkpoint, and no effect on training."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, read_metrics, run_module
from safetensors.torch import load_file

from hvdbert.prepare import main as prepare_main

PREPARE = ["--input", "builtin", "--builtin-max-documents", "300", "--seq-len", "64", "--vocab-size", "1500"]
SHORT = ["--recipe", str(TINY), "--set", "train.progress_bar=false", "--set", "train.max_steps=4",
         "--set", "checkpoint.every_steps=2"]


@pytest.fixture
def data(held_out_data) -> Path:
    return held_out_data


@pytest.mark.multiprocess
def test_same_figure_for_one_and_two_workers_and_in_the_run(tmp_path, hvdbert_env, cli, data):
    run_dir = tmp_path / "run"
    result = run_module("hvdbert.pretrain", [*SHORT, "--data", str(data), "--output", str(run_dir),
                                             "--set", "eval.every_steps=2", "--set", "eval.max_sequences=64"],
                        hvdbert_env, np=2, launcher="gloo", timeout=400)
    in_run = {row["step"]: row for row in read_metrics(run_dir) if "eval_loss" in row}
    assert sorted(in_run) == [2, 4]
    assert in_run[2]["eval_sequences"] == 64 and in_run[4]["eval_loss"] < in_run[2]["eval_loss"]
    assert in_run[2]["eval_perplexity"] == pytest.approx(2.718281828459045 ** in_run[2]["eval_loss"])
    assert "held-out loss" in result.stdout and "perplexity" in result.stdout
    checkpoint = run_dir / "checkpoints" / "step-2"
    args = ["--run", str(run_dir), "--checkpoint", str(checkpoint)]
    assert cli("hvdbert.evaluate", [*args, "--json", tmp_path / "one.json"]).returncode == 0
    run_module("hvdbert.evaluate", [*args, "--json", str(tmp_path / "two.json")], hvdbert_env, np=2,
               launcher="gloo", timeout=200)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["step"] == 2 and one["eval_sequences"] == two["eval_sequences"] == 64
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-6, abs=1e-6)
    assert one["eval_loss"] == pytest.approx(in_run[2]["eval_loss"], rel=1e-6, abs=1e-6)
    assert one["eval_mlm_accuracy"] == pytest.approx(in_run[2]["eval_mlm_accuracy"], abs=1e-9)

    # mpirun's multiple-program form gives rank 1 other held-out data (the same tokenizer): every rank
    # stops before evaluating, as pretrain's ranks do, instead of mixing both sets into one figure
    evaluate = [sys.executable, "-m", "hvdbert.evaluate", *args, "--json", str(tmp_path / "mixed.json")]
    mixed = subprocess.run(["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "1", *evaluate, "--data",
                            str(data / "validation"), ":", "-np", "1", *evaluate, "--data", str(data)],
                           cwd=REPO, env=hvdbert_env, capture_output=True, text=True, timeout=300)
    errors = [line for line in mixed.stderr.splitlines() if "hvdbert.evaluate: error:" in line]
    assert mixed.returncode == 2 and "Traceback" not in mixed.stderr, mixed.stderr[-3000:]
    assert len(errors) == 1 and "rank 1 (host" in errors[0] and "has another prepared data" in errors[0], errors
    assert f"reads {data}; rank 0 reads {data / 'validation'}" in errors[0]
    assert not (tmp_path / "mixed.json").exists()


def test_evaluation_leaves_training_untouched(tmp_path, cli, data):
    runs = {}
    for name, extra in (("plain", []), ("evaluated", ["--set", "eval.every_steps=1", "--set", "eval.at_end=true"])):
        run_dir = tmp_path / name
        assert cli("hvdbert.pretrain", [*SHORT, "--data", data, "--output", run_dir, "--set", "train.log_every=1",
                                        "--set", "eval.max_sequences=32", *extra]).returncode == 0
        runs[name] = run_dir
    plain, evaluated = read_metrics(runs["plain"]), read_metrics(runs["evaluated"])
    assert all("eval_loss" in row for row in evaluated) and not any("eval_loss" in row for row in plain)
    # the baseline is a property of the held-out tokens and the training data: the same at every step
    assert len({row["eval_unigram_cross_entropy"] for row in evaluated}) == 1
    assert [row["loss"] for row in evaluated] == [row["loss"] for row in plain]  # bit for bit
    weights = [load_file(str(runs[n] / "checkpoints" / "step-4" / "model.safetensors")) for n in runs]
    assert all(bool((weights[0][k] == weights[1][k]).all()) for k in weights[0])


@pytest.fixture(scope="module")
def other_tokenizer_data(tmp_path_factory) -> Path:
    """60 documents prepared with a tokenizer of their own: not the held-out data's vocabulary."""
    other = tmp_path_factory.mktemp("other") / "data"
    assert prepare_main([*PREPARE, "--builtin-max-documents", "60", "--vocab-size", "600", "--output", str(other)]) == 0
    return other


def test_refusals_are_one_line_and_write_nothing(tmp_path, cli, data, other_tokenizer_data):
    bare = tmp_path / "bare"  # the same tokenizer, no held-out split
    assert cli("hvdbert.prepare", [*PREPARE, "--builtin-max-documents", "60", "--tokenizer", data / "tokenizer",
                                   "--output", bare]).returncode == 0
    # plan's pre-flight (--output, --data) refuses what pretrain refuses: no held-out split to evaluate on
    checked = cli("hvdbert.plan", ["--recipe", TINY, "--workers", 2, "--output", tmp_path / "run", "--data", bare,
                                   "--set", "eval.at_end=true"])
    assert checked.returncode == 2 and "has no held-out split" in checked.stderr, checked.stderr
    other = other_tokenizer_data
    cases = [
        (["--data", str(bare), "--set", "eval.at_end=true"], "has no held-out split"),
        (["--data", str(data), "--eval-data", str(other), "--set", "eval.every_steps=2"], "another tokenizer"),
        (["--data", str(data), "--eval-data", str(bare)], "the recipe asks for no evaluation"),
    ]
    for extra, message in cases:
        run_dir = tmp_path / "run"
        result = cli("hvdbert.pretrain", [*SHORT, "--output", run_dir, *extra])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
        assert not run_dir.exists()
        # the launchers' form (plan -- PRETRAIN ARGS) refuses the same arguments in the same words
        checked = cli("hvdbert.plan", ["--workers", 2, "--", *SHORT, "--output", run_dir, *extra])
        assert checked.returncode == 2, checked.stderr
        assert checked.stderr.strip() == lines[0].replace("hvdbert.pretrain:", "hvdbert.plan:", 1)
    # --eval-data with the same tokenizer is taken
    ok = tmp_path / "ok"
    done = cli("hvdbert.pretrain", [*SHORT, "--set", "train.max_steps=2", "--data", data, "--eval-data", bare,
                                    "--set", "eval.at_end=true", "--output", ok])
    assert done.returncode == 0
    last = read_metrics(ok)[-1]
    assert last["step"] == 2 and last["eval_sequences"] > 0
    # the baseline's frequencies are the training data's, whichever held-out data is evaluated
    summary = [line for line in done.stdout.splitlines() if line.startswith("hvdbert: done:")]
    assert len(summary) == 1 and f"a training-unigram predictor's {last['eval_unigram_cross_entropy']:.4f}" in summary[0]
    assert json.loads((ok / "recipe.json").read_text())["eval_data_dir"] == str(bare)


def without_token_counts(data: Path, copy: Path) -> Path:
    """A copy of `data` as prepare wrote it before it stored the training token counts."""
    shutil.copytree(data, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["token_counts_sha256"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    (copy / "token_counts.npy").unlink()
    return copy


def test_a_transformers_model_directory_gets_the_checkpoints_figure(tmp_path, cli, data, other_tokenizer_data):
    """--model HF_DIR (a Trainer checkpoint, an export) is evaluated on the same sequences and masks as
    the checkpoint it came from: the figure is the same, whatever micro-batch each path cuts."""
    run_dir, exported = tmp_path / "run", tmp_path / "hf"
    assert cli("hvdbert.pretrain", [*SHORT, "--set", "train.max_steps=2", "--data", data, "--output",
                                    run_dir]).returncode == 0
    assert cli("hvdbert.export", ["--run", run_dir, "--output", exported]).returncode == 0
    sets = ["--set", "eval.max_sequences=48"]
    assert cli("hvdbert.evaluate", ["--run", run_dir, *sets, "--json", tmp_path / "run.json"]).returncode == 0
    result = cli("hvdbert.evaluate", ["--model", exported, "--data", data / "validation", *sets,
                                      "--set", "batch.micro_batch_size=7", "--json", tmp_path / "hf.json"])
    assert result.returncode == 0, result.stderr
    ours, theirs = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("run", "hf"))
    assert ours["step"] == 2 and theirs["model"] == str(exported) and theirs["step"] is None
    assert ours["eval_sequences"] == theirs["eval_sequences"] == 48
    assert ours["eval_masked_tokens"] == theirs["eval_masked_tokens"]
    assert ours["eval_unigram_cross_entropy"] == theirs["eval_unigram_cross_entropy"]  # --data's parent's counts
    assert theirs["eval_loss"] == pytest.approx(ours["eval_loss"], rel=1e-5)
    assert theirs["eval_mlm_accuracy"] == pytest.approx(ours["eval_mlm_accuracy"], abs=1e-9)
    assert "held-out loss" in result.stdout and "training-unigram predictor's" in result.stdout
    assert result.stderr.strip() == ""

    # No training counts: held-out data that is no prepared data's split, or data prepared before
    # prepare stored them. One warning line, no baseline, the model's figures all the same.
    loose, old = tmp_path / "loose", without_token_counts(data, tmp_path / "old")
    shutil.copytree(data / "validation", loose)
    for held_out, why in ((loose, f"--data {loose} is not the validation split of prepared data"),
                          (old / "validation", f"{old} was prepared before hvdbert stored the training data's token counts")):
        result = cli("hvdbert.evaluate", ["--model", exported, "--data", held_out, *sets, "--json", tmp_path / "none.json"])
        status, err = result.exit_and_stderr_lines()
        assert status == 0 and len(err) == 1 and err[0].startswith(f"hvdbert.evaluate: warning: {why}"), err
        none = json.loads((tmp_path / "none.json").read_text())
        assert "eval_unigram_cross_entropy" not in none and none["eval_loss"] == pytest.approx(theirs["eval_loss"], rel=1e-6)
        assert "training-unigram" not in result.stdout

    other = other_tokenizer_data
    for args, message in ((["--model", str(exported), "--data", str(other)], "another vocabulary"),
                          (["--model", str(exported)], "--data"),
                          (["--model", str(run_dir), "--data", str(data / "validation")], "config.json"),
                          (["--run", str(run_dir), "--model", str(exported)], "one of")):
        result = cli("hvdbert.evaluate", args)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr

    # Sentence pairs for a run trained without NSP: its NSP head never learned, so no NSP figure, from
    # the run's checkpoint as from --model (refused above by the missing head) and in training.
    from hvdbert import evaluate
    from hvdbert.config import load_recipe
    from hvdbert.data.shards import PreparedData
    from hvdbert.errors import UsageError

    pairs = tmp_path / "pairs"
    assert cli("hvdbert.prepare", [*PREPARE, "--builtin-max-documents", "60", "--format", "nsp",
                                   "--tokenizer", data / "tokenizer", "--output", pairs]).returncode == 0
    refusal = (f"{pairs}: holds sentence pairs (--format nsp), but the model was trained on mlm data without "
               "next-sentence prediction; evaluate it on data prepared with --format mlm")
    status, err = cli("hvdbert.evaluate", ["--run", run_dir, "--data", pairs,
                                           "--json", tmp_path / "pairs.json"]).exit_and_stderr_lines()
    assert status == 2 and err == [f"hvdbert.evaluate: error: --data {refusal}"]
    assert not (tmp_path / "pairs.json").exists()
    with pytest.raises(UsageError) as refused:
        evaluate.open_eval_data(pairs, PreparedData(data), load_recipe(TINY), "--eval-data", trained_nsp=False)
    assert str(refused.value) == f"--eval-data {refusal}"


def in_run_and_standalone(tmp_path, cli, args: list[str]) -> tuple[dict, dict]:
    """The held-out figures a 4-step run logged at its end, and hvdbert.evaluate's for its last checkpoint."""
    run_dir = tmp_path / "run"
    assert cli("hvdbert.pretrain", [*args, "--output", run_dir, "--set", "eval.at_end=true",
                                    "--set", "eval.max_sequences=32"]).returncode == 0
    in_run = read_metrics(run_dir)[-1]
    assert cli("hvdbert.evaluate", ["--run", run_dir, "--json", tmp_path / "eval.json"]).returncode == 0
    return in_run, json.loads((tmp_path / "eval.json").read_text())


def test_sentence_pair_data_gets_nsp_figures_in_the_run_and_from_a_checkpoint(tmp_path, cli, nsp_run):
    in_run = read_metrics(nsp_run)[-1]
    assert cli("hvdbert.evaluate", ["--run", nsp_run, "--json", tmp_path / "eval.json"]).returncode == 0
    standalone = json.loads((tmp_path / "eval.json").read_text())
    assert in_run["step"] == 4 and 0.0 <= in_run["eval_nsp_accuracy"] <= 1.0 and in_run["eval_nsp_loss"] > 0
    assert standalone["step"] == 4
    for key in ("eval_loss", "eval_nsp_loss"):
        assert standalone[key] == pytest.approx(in_run[key], rel=1e-6, abs=1e-6)
    assert standalone["eval_nsp_accuracy"] == pytest.approx(in_run["eval_nsp_accuracy"], abs=1e-9)


def test_a_modernbert_checkpoint_gets_the_runs_figure(tmp_path, cli, data):
    modernbert = ["--recipe", str(TINY.parent / "tiny-modernbert.toml"), *SHORT[2:]]
    in_run, standalone = in_run_and_standalone(tmp_path, cli, [*modernbert, "--data", str(data)])
    assert in_run["step"] == standalone["step"] == 4 and "eval_nsp_loss" not in in_run
    assert standalone["eval_loss"] == pytest.approx(in_run["eval_loss"], rel=1e-6, abs=1e-6)
    assert standalone["eval_mlm_accuracy"] == pytest.approx(in_run["eval_mlm_accuracy"], abs=1e-9)


def test_the_unigram_baseline_by_hand():
    from hvdbert.evaluate import unigram_cross_entropy

    # ids 0-2 are never masked ([PAD], [CLS], [SEP]); training saw id 3 three times, id 4 once, id 5
    # never: add-one gives 3 -> 4/7, 4 -> 2/7, 5 -> 1/7
    counts = np.array([7, 2, 2, 3, 1, 0])
    loss = unigram_cross_entropy(counts, np.array([3, 3, 5]), (0, 1, 2))
    assert loss == pytest.approx(-(2 * np.log(4 / 7) + np.log(1 / 7)) / 3) == pytest.approx(1.0217140, abs=1e-6)


def test_prepare_counts_the_training_tokens(tmp_path, data):
    from hvdbert.data.shards import PreparedData
    from hvdbert.errors import UsageError

    train = PreparedData(data)
    counts = train.token_counts()
    assert counts.dtype == np.int64 and counts.shape == (train.manifest.vocab_size,)
    every_token = train.get(np.arange(len(train)))["input_ids"].ravel()
    assert np.array_equal(counts, np.bincount(every_token, minlength=counts.size))
    assert PreparedData(data / "validation").token_counts() is None  # held-out tokens are never counted
    damaged = tmp_path / "damaged"
    shutil.copytree(data, damaged)
    raw = bytearray((damaged / "token_counts.npy").read_bytes())
    raw[-1] ^= 1
    (damaged / "token_counts.npy").write_bytes(bytes(raw))
    with pytest.raises(UsageError, match="token_counts.npy is damaged"):
        PreparedData(damaged).token_counts()


def test_a_run_on_data_prepared_without_token_counts_warns_once_and_reports_no_baseline(tmp_path, cli, data):
    old = without_token_counts(data, tmp_path / "old")
    result = cli("hvdbert.pretrain", [*SHORT, "--set", "train.max_steps=2", "--data", old, "--output", tmp_path / "run",
                                      "--set", "eval.at_end=true", "--set", "eval.max_sequences=16"])
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "no unigram baseline" in line]
    assert warnings == [f"hvdbert: {old} was prepared before hvdbert stored the training data's token counts: no "
                        "unigram baseline (eval_unigram_cross_entropy); prepare the data again to get one"]
    last = read_metrics(tmp_path / "run")[-1]
    assert last["eval_sequences"] == 16 and "eval_unigram_cross_entropy" not in last
    assert "held-out loss" in result.stdout and "training-unigram" not in result.stdout


def test_a_json_path_that_is_a_directory_is_refused_before_any_work(tmp_path, cli):
    taken = tmp_path / "results"
    taken.mkdir()
    status, err = cli("hvdbert.evaluate", ["--run", tmp_path / "no-run", "--json", taken]).exit_and_stderr_lines()
    assert status == 2 and err == [f"hvdbert.evaluate: error: --json {taken} is a directory; name a file, "
                                   f"e.g. --json {taken / 'results.json'}"], err
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # no results.tmp
