"""`python -m hvdbert.bench`: a real small run at 1 and 2 Horovod workers (no timing assertions)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, TINY, run_module
from hvdbert.bench import training_flops_per_sequence

BREAKDOWN = ("data_wait", "forward_backward", "gradient_sync", "optimizer")


@pytest.fixture(scope="module")
def bench_run(hvdbert_env, tmp_path_factory):
    """One benchmark at 1 and 2 workers: hvdbert, hvdbert with fp16 allreduce, and the DDP peer on
    hvdbert's model, started from outside the repository (the peers are modules of the installed
    package, so --peers works from any directory)."""
    output = tmp_path_factory.mktemp("bench")
    result = subprocess.run([sys.executable, "-m", "hvdbert.bench", "--recipe", str(TINY), "--workers", "1,2",
                             "--steps", "3", "--warmup-steps", "1", "--vary", "dist.fp16_allreduce=true",
                             "--peers", "ddp-hvdbert-model", "--output", "out", "--json", "top.json", *FAST],
                            cwd=output, env=hvdbert_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return output / "out", result


def bench_rows(output) -> list[dict]:
    return json.loads((output / "bench.json").read_text())["rows"]


@pytest.mark.multiprocess
def test_json_has_the_contract_fields(bench_run):
    output, _ = bench_run
    top = json.loads((output.parent / "top.json").read_text())
    assert top["workers"] == 2
    for key in ("seq_per_s", "tokens_per_s", "mfu", "step_seconds"):
        assert math.isfinite(top[key]) and top[key] > 0, key
    assert set(top["breakdown_seconds"]) == set(BREAKDOWN)
    assert top == json.loads((output / "bench.json").read_text())
    (round_,) = top["rounds"]  # one repeat: one round, with the 2-worker efficiency computed in it
    assert round_["ratios"]["scaling_efficiency hvdbert x2"] == pytest.approx(top["scaling_efficiency"])
    # the step-cost ratio from CPU time, within the round, and its range over the (one) round
    cost = round_["ratios"]["hvdbert x2 / ddp-hvdbert-model x2 CPU-s per sequence"]
    assert cost == pytest.approx(top["cpu_vs_ddp-hvdbert-model"]) and cost > 0
    assert top["ratio_ranges"]["hvdbert x2 / ddp-hvdbert-model x2 CPU-s per sequence"] == [cost, cost]


@pytest.mark.multiprocess
def test_every_row_is_positive_and_its_breakdown_sums_to_the_step(bench_run):
    output, _ = bench_run
    rows = bench_rows(output)
    assert sorted((r["label"], r["workers"]) for r in rows) == [
        ("ddp-hvdbert-model", 1), ("ddp-hvdbert-model", 2), ("hvdbert", 1), ("hvdbert", 2),
        ("hvdbert dist.fp16_allreduce=true", 2)]
    for row in rows:
        for key in ("seq_per_s", "tokens_per_s", "mfu", "step_seconds", "cpu_seconds_per_step", "peak_memory_bytes",
                    "peak_flops"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["label"], key)
        # CPU time summed over the workers: tiny.toml's one compute thread each, plus the loader's and
        # Horovod's threads, so at most about one core per worker and step; a bound (a load peak only
        # lowers it) that catches a wrong unit or a sum over the wrong window
        assert row["cpu_seconds_per_step"] < 3 * row["workers"] * row["step_seconds"], row["label"]
        assert row["cpu_seconds_per_sequence"] * row["global_batch_size"] == pytest.approx(row["cpu_seconds_per_step"])
        assert 0 < row["mfu"] < 1
        # packed sequences have no padding: every token is real
        assert row["tokens_per_s"] == pytest.approx(row["seq_per_s"] * row["seq_len"], rel=1e-6)
        breakdown = row["breakdown_seconds"]
        assert all(v >= 0 for v in breakdown.values())
        # the four phases cover the step; only loop bookkeeping falls outside them
        assert sum(breakdown.values()) == pytest.approx(row["step_seconds"], rel=0.10)
    single = next(r for r in rows if r["workers"] == 1 and r["system"] == "hvdbert")
    # one process: nothing to reduce, only the two clock reads around the no-op synchronize
    assert single["breakdown_seconds"]["gradient_sync"] < 0.2 * single["step_seconds"]
    assert single["scaling_efficiency"] == 1.0


@pytest.mark.multiprocess
def test_fp16_allreduce_halves_the_counted_bytes(bench_run):
    output, _ = bench_run
    rows = {(r["label"], r["workers"]): r for r in bench_rows(output)}
    fp32, fp16 = rows[("hvdbert", 2)], rows[("hvdbert dist.fp16_allreduce=true", 2)]
    assert fp32["allreduce_payload_bytes_per_step"] == 4 * fp32["trainable_parameters"]
    assert fp16["allreduce_payload_bytes_per_step"] * 2 == fp32["allreduce_payload_bytes_per_step"]
    assert fp32["allreduce_wire_bytes_per_rank_per_step"] == fp32["allreduce_payload_bytes_per_step"]  # 2(N-1)/N
    assert rows[("hvdbert", 1)]["allreduce_payload_bytes_per_step"] == 0


@pytest.mark.multiprocess
def test_table_and_plot_are_written(bench_run):
    output, result = bench_run
    table = (output / "bench.md").read_text()
    assert table.count("\n") == 2 + 5  # header, rule, one line per row
    assert "| hvdbert (Horovod) | 2 |" in table and table in result.stdout
    assert (output / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flops_formula_counts_the_gathered_head_only():
    bert_base = dict(vocab_size=30528, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072)
    encoder_weights = 12 * (4 * 768**2 + 2 * 768 * 3072)  # 85M: BERT-base without embeddings and head
    head = 768**2 + 768 * 30528
    assert training_flops_per_sequence(bert_base, 128, 20) == 6 * encoder_weights * 128 + 12 * 12 * 768 * 128**2 \
        + 6 * head * 20
    assert training_flops_per_sequence(bert_base, 128, 128) - training_flops_per_sequence(bert_base, 128, 20) \
        == 6 * head * 108


@pytest.mark.parametrize("args, expected", [
    (["--workers", "two"], "--workers 'two': expected worker counts"),
    (["--peers", "deepspeed"], "unknown peer 'deepspeed'"),
    # refused before any configuration runs, and at 1 worker too, where variants never run
    (["--workers", "1,2", "--vary", "nosuch.key=1"], "--vary nosuch.key=1: unknown key nosuch"),
    (["--workers", "1,2", "--vary", "dist.cycle_time_ms=1,-5"], "--vary dist.cycle_time_ms=1,-5: dist.cycle_time_ms = "
                                                                "-5.0 must be 0 (by device) or more"),
    (["--vary", "nosuch.key=1"], "--vary nosuch.key=1: unknown key nosuch"),
    (["--vary", "dist.cycle_time_ms=1"], "--vary dist.cycle_time_ms=1: variants run hvdbert at more than 1 worker, "
                                         "and --workers 1 has none; add one, e.g. --workers 1,2"),
    # the shaped-cluster benchmark (bench/cluster.py): refused before any host is made
    (["--hosts", "2"], "--hosts and --link go together"),
    (["--hosts", "1", "--link", "1gbit"], "--hosts '1': host counts must be from 2 to 8"),
    (["--hosts", "2", "--link", "fast"], "link rate 'fast': expected a positive number and a unit"),
    (["--hosts", "2", "--link", "1gbit", "--peers", "hf"], "--hosts runs one worker per host"),
    (["--hosts", "2", "--link", "1gbit", "--overlap", "2"], "--overlap 2.0: must be from 0 to 1"),
    (["--hosts", "2", "--link", "1gbit", "--vary", "dist.cache_capacity=-1"],
     "--vary dist.cache_capacity=-1: dist.cache_capacity = -1 must be from 0 to"),
])
def test_bad_flags_are_one_line_errors(cli, args, expected):
    status, err = cli("hvdbert.bench.cli", ["--recipe", TINY, *args]).exit_and_stderr_lines()
    assert status == 2 and len(err) == 1 and expected in err[0], err


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the search runs")
def test_find_max_batch_says_it_needs_a_gpu(cli):
    result = cli("hvdbert.bench.cli", ["--recipe", TINY, "--find-max-batch", *FAST])
    assert result.returncode == 2 and "CUDA" in result.stderr


@pytest.mark.multiprocess
def test_ddp_peer_computes_hvdbert_losses_step_by_step(bench_run):
    """The DDP peer on hvdbert's model computes hvdbert's losses step by step: only the communication
    layer differs."""
    output, _ = bench_run
    rows = {(r["system"], r["workers"]): r for r in bench_rows(output) if "dist." not in r["label"]}
    assert set(rows) == {("hvdbert", 1), ("hvdbert", 2), ("ddp-hvdbert-model", 1), ("ddp-hvdbert-model", 2)}
    for workers in (1, 2):
        ours, theirs = rows[("hvdbert", workers)], rows[("ddp-hvdbert-model", workers)]
        assert theirs["backend"] == "torch-ddp-gloo" and theirs["global_batch_size"] == ours["global_batch_size"]
        assert len(ours["step_losses"]) == len(theirs["step_losses"]) == 4
        assert max(abs(a - b) for a, b in zip(ours["step_losses"], theirs["step_losses"])) <= 1e-5
        assert ours["vs_ddp-hvdbert-model"] == pytest.approx(ours["seq_per_s"] / theirs["seq_per_s"])
    assert "vs DDP, same model" in (output / "bench.md").read_text()


def test_run_mlm_peers_refuse_another_corpus(cli, tmp_path):
    result = cli("hvdbert.bench.cli", ["--recipe", TINY, "--data", tmp_path, "--peers", "hf"])
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "ddp-hvdbert-model" in result.stderr


# ------------------------------------------------------------------------------------------------
# bench/time_to_quality.py: hvdbert against the Trainer on run_mlm.py's recipe, end to end on a tiny shape

TINY_SHAPE = ["--set", "model.vocab_size=1500", "--set", "model.hidden_size=64", "--set", "model.num_hidden_layers=2",
              "--set", "model.num_attention_heads=2", "--set", "model.intermediate_size=128",
              "--set", "data.max_seq_len=64", "--set", "data.max_predictions_per_seq=10",
              "--set", "batch.micro_batch_size=4", "--set", "eval.max_sequences=32"]


def test_time_to_quality_end_to_end(hvdbert_env, held_out_data, tmp_path):
    """Both systems train, save, are evaluated alike and probed; the headline follows from the rows.
    hvdbert's AdamW at 2e-3 against the Trainer at 1e-5 (which barely moves in 4 steps): hvdbert passes
    the Trainer's final loss, so the ratio is computed, and checked against the rows."""
    from bench.time_to_quality import cpu_to_reach

    output = tmp_path / "out"
    result = run_module("bench.time_to_quality", [
        "--data", str(held_out_data), "--output", str(output), "--workdir", str(tmp_path / "runs"),
        "--hvdbert", "adamw:2e-3", "--trainer", "1e-5", "--steps", "4", "--save-every", "2",
        "--global-batch-size", "8", "--probe-seeds", "1", "--probe-epochs", "1", "--probe-lr", "1e-3",
        "--probe-train-per-class", "4", *TINY_SHAPE,
    ], hvdbert_env, timeout=400)
    rows = [json.loads(line) for line in (output / "quality.jsonl").read_text().splitlines()]
    curves = {system: [r for r in rows if r["system"] == system] for system in ("hvdbert", "trainer")}
    assert [r["lr"] for r in curves["hvdbert"]] == ["2e-3"] * 2 and [r["lr"] for r in curves["trainer"]] == ["1e-5"] * 2
    for curve in curves.values():
        assert [r["step"] for r in curve] == [2, 4] and [r["samples"] for r in curve] == [16, 32]
        assert 0 < curve[0]["cpu_seconds"] < curve[1]["cpu_seconds"]
        assert all(math.isfinite(r["eval_loss"]) and 0 <= r["eval_mlm_accuracy"] <= 1 for r in curve)
        assert all(r["eval_sequences"] == 32 for r in curve)
    # the same held-out tokens and masks for every model
    assert len({r["eval_unigram_cross_entropy"] for r in rows}) == 1

    summary = json.loads((output / "summary.json").read_text())
    trainer_final = curves["trainer"][-1]
    assert summary["target_eval_loss"] == trainer_final["eval_loss"]
    reach = cpu_to_reach(curves["hvdbert"], trainer_final["eval_loss"])
    assert reach["interpolated"] is not None, rows
    assert summary["cpu_ratio"] == pytest.approx(reach["interpolated"] / trainer_final["cpu_seconds"])
    assert summary["cpu_ratio_first_save"] == pytest.approx(reach["first_save"] / trainer_final["cpu_seconds"])
    common = max(trainer_final["eval_loss"], curves["hvdbert"][-1]["eval_loss"])
    assert summary["common_eval_loss"] == common
    assert summary["cpu_ratio_common"] == pytest.approx(cpu_to_reach(curves["hvdbert"], common)["interpolated"]
                                                        / cpu_to_reach(curves["trainer"], common)["interpolated"])
    assert [(p["model"], p["seed"]) for p in summary["probe"]] == [("hvdbert", 1), ("trainer", 1), ("from scratch", 1)]
    assert all(0 <= p["dev_accuracy"] <= 1 and p["epochs"] == 1 and p["lr"] == 1e-3 for p in summary["probe"])
    assert all(p["train_examples"] == 4 * 8 and p["train_per_class"] == 4 for p in summary["probe"])  # 8 classes

    table = (output / "quality.md").read_text()
    assert table in result.stdout and "32 training (at most 4 per class)" in table
    assert "| hvdbert | adamw | 2e-3 (best) |" in table and "| HF Trainer (run_mlm.py) | adamw | 1e-5 (best) |" in table
    assert f"**{summary['cpu_ratio']:.2f}x**" in table and f"**{summary['cpu_ratio_common']:.2f}x**" in table
    assert "| from scratch | 1 |" in table
    assert (output / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The Trainer's checkpoints are transformers directories that hvdbert.evaluate takes as they are
    trainer_dir = tmp_path / "runs" / "trainer-adamw-1e-5" / "checkpoint-4"
    run_module("hvdbert.evaluate", ["--model", str(trainer_dir), "--data", str(held_out_data / "validation"),
                                    "--set", "eval.max_sequences=32", "--set", "batch.micro_batch_size=4",
                                    "--json", str(tmp_path / "again.json")], hvdbert_env, timeout=200)
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["eval_loss"] == pytest.approx(trainer_final["eval_loss"], rel=1e-6)
    assert again["eval_unigram_cross_entropy"] == pytest.approx(trainer_final["eval_unigram_cross_entropy"])


def test_cpu_to_reach_interpolates_between_saves():
    from bench.time_to_quality import cpu_to_reach

    curve = [{"step": 1, "cpu_seconds": 10.0, "eval_loss": 7.0}, {"step": 2, "cpu_seconds": 20.0, "eval_loss": 6.0},
             {"step": 3, "cpu_seconds": 30.0, "eval_loss": 5.0}]
    assert cpu_to_reach(curve, 5.5) == {"interpolated": 25.0, "first_save": 30.0, "step": 3}
    assert cpu_to_reach(curve, 6.0) == {"interpolated": 20.0, "first_save": 20.0, "step": 2}
    assert cpu_to_reach(curve, 7.5) == {"interpolated": 10.0, "first_save": 10.0, "step": 1}  # nothing measured earlier
    assert cpu_to_reach(curve, 4.9)["interpolated"] is None


def test_time_to_quality_refuses_bad_input_in_one_line(cli, held_out_data, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("Some other text.\n\nAnd another document.\n")
    base = ["--data", str(held_out_data), "--output", str(tmp_path / "out"), "--workdir", str(tmp_path / "runs"),
            *TINY_SHAPE]
    for extra, message in ((["--hvdbert", "adamw"], "OPTIMIZER:LR"), (["--trainer", "0,1e-3"], "positive"),
                           (["--hvdbert", "sgd:1e-3"], "optim.name"), (["--input", str(other)], "not the ones"),
                           (["--steps", "0"], "--steps")):
        result = cli("bench.time_to_quality", [*base, *extra])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


# bench/compression_quality.py: compressions x seeds at equal steps, and the derived time to quality


@pytest.mark.multiprocess
def test_compression_quality_end_to_end_on_two_horovod_workers(hvdbert_env, held_out_data, tmp_path):
    """Each compression trains under horovodrun -np 2 and is evaluated on the held-out split; the
    table follows from the curves; a second call reads the finished runs back instead of training,
    also through a copy of the recipe elsewhere (a moved checkout)."""
    from bench.compression_quality import summarise

    output, workdir = tmp_path / "out", tmp_path / "runs"
    args = ["--data", str(held_out_data), "--output", str(output), "--workdir", str(workdir), "--workers", "2",
            "--compression", "none,powersgd", "--seeds", "1", "--steps", "2", "--eval-every", "1",
            "--global-batch-size", "8", *TINY_SHAPE]
    result = run_module("bench.compression_quality", args, hvdbert_env, timeout=400)
    saved = json.loads((output / "quality.json").read_text())
    for compression in ("none", "powersgd"):
        metrics = [json.loads(line) for line in (workdir / f"{compression}-seed-1" / "metrics.jsonl").read_text().splitlines()]
        assert [r["workers"] for r in metrics] == [2, 2] and all("eval_loss" in r for r in metrics)
        assert saved["curves"][compression] == [[{"step": r["step"], "eval_loss": r["eval_loss"]} for r in metrics]]
    assert saved["rows"] == summarise(saved["curves"])["rows"]
    none, powersgd = saved["rows"]
    assert powersgd["same_seed_difference"] == [powersgd["final_eval_loss"][0] - none["final_eval_loss"][0]] != [0.0]
    assert (output / "quality.md").read_text() in result.stdout
    moved = tmp_path / "moved" / "bert-mini-cpu.toml"
    moved.parent.mkdir()
    shutil.copy(REPO / "bench" / "recipes" / "bert-mini-cpu.toml", moved)
    again = run_module("bench.compression_quality", [*args, "--recipe", str(moved)], hvdbert_env, timeout=60)
    assert "powersgd, seed 1: held-out loss" in again.stderr
    assert json.loads((output / "quality.json").read_text())["rows"] == saved["rows"]


def test_compression_quality_keys_finished_runs_by_the_recipe_s_keys_not_its_path(tmp_path):
    """A copy of the recipe (or the checkout moved) matches the finished runs; a changed key, also one
    inherited from a parent recipe, does not."""
    from bench.compression_quality import run_settings

    (tmp_path / "parent.toml").write_text("[model]\nhidden_size = 64\n")
    child = tmp_path / "child.toml"
    child.write_text('inherit = "parent.toml"\n[train]\nmax_steps = 3\n')
    args = type("Args", (), {"recipe": child, "data": tmp_path, "workers": 2, "set": [], "steps": 30,
                             "global_batch_size": 32, "lr": 1e-3, "eval_every": 10})
    settings = json.loads(json.dumps(run_settings(args, "none", 1)))  # as quality-run.json holds it
    assert settings["recipe"] == {"model": {"hidden_size": 64}, "train": {"max_steps": 3}}
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path, moved, ignore=shutil.ignore_patterns("moved"))
    args.recipe = moved / "child.toml"
    assert run_settings(args, "none", 1) == settings
    (moved / "parent.toml").write_text("[model]\nhidden_size = 128\n")
    assert run_settings(args, "none", 1) != settings
    assert run_settings(args, "none", 2)["sets"] != settings["sets"]


def test_compression_quality_summary_by_hand():
    """Means, spreads and differences from the reference, the step where the seed-mean curve reaches
    the reference's mean final loss (interpolated), and the time to it at a shaped link's step times."""
    from bench.compression_quality import report, run_sets, step_seconds_at, summarise
    from hvdbert.errors import UsageError

    def curve(*losses):
        return [{"step": 10 * (i + 1), "eval_loss": loss} for i, loss in enumerate(losses)]

    curves = {"none": [curve(7.0, 6.0, 5.0), curve(7.0, 6.2, 5.2)],  # mean final 5.1
              "powersgd": [curve(7.0, 5.6, 5.1), curve(7.0, 5.8, 5.3)]}  # mean curve 7.0, 5.7, 5.2: never 5.1
    shaped = {"rows": [{"system": "hvdbert", "link": "25mbit", "compression": None, "step_seconds": 9.0},
                       {"system": "hvdbert", "link": "25mbit", "compression": "powersgd", "step_seconds": 2.0},
                       {"system": "ddp-hvdbert-model", "link": "25mbit", "compression": None, "step_seconds": 1.0},
                       {"system": "hvdbert", "link": "1gbit", "compression": None, "step_seconds": 1.5}]}
    step_seconds = step_seconds_at(shaped, "25mbit")
    assert step_seconds == {"none": 9.0, "powersgd": 2.0}
    summary = summarise(curves, step_seconds)
    assert summary["reference"] == "none" and summary["target_eval_loss"] == pytest.approx(5.1)
    none, powersgd = summary["rows"]
    assert none["steps_to_target"] == pytest.approx(30.0) and none["seconds_to_target"] == pytest.approx(270.0)
    assert powersgd["mean"] == pytest.approx(5.2) and powersgd["spread"] == pytest.approx(0.2)
    assert powersgd["mean_difference"] == pytest.approx(0.1)
    assert powersgd["same_seed_difference"] == pytest.approx([0.1, 0.1])
    assert powersgd["steps_to_target"] is None and powersgd["seconds_to_target"] is None
    assert powersgd["steps_to_target_per_seed"] == [pytest.approx(30.0), None]  # each seed's own run
    assert none["steps_to_target_per_seed"] == [pytest.approx(29.0), None]
    assert "speedup_to_target" not in powersgd and none["speedup_to_target"] == 1.0
    # the common loss, powersgd's 5.2: none's mean curve (7.0, 6.1, 5.1) at 20 + 10 x 0.9 / 1.0 steps
    assert summary["common_eval_loss"] == pytest.approx(5.2)
    assert none["steps_to_common"] == pytest.approx(29.0) and powersgd["steps_to_common"] == pytest.approx(30.0)
    assert powersgd["speedup_to_common"] == pytest.approx(29.0 * 9.0 / (30.0 * 2.0))
    # a target the compressed curve does reach: between its evaluations at 20 and 30 steps
    curves["powersgd"] = [curve(7.0, 5.6, 4.9), curve(7.0, 5.8, 5.1)]  # mean curve 7.0, 5.7, 5.0
    powersgd = summarise(curves, step_seconds)["rows"][1]
    assert powersgd["steps_to_target"] == pytest.approx(20 + 10 * 0.6 / 0.7)
    assert powersgd["speedup_to_target"] == pytest.approx(270.0 / (2.0 * (20 + 10 * 0.6 / 0.7)))
    args = type("Args", (), {"argv": ["--data", "D"], "set": [], "steps": 30, "global_batch_size": 32, "lr": 1e-3,
                             "workers": 2, "eval_every": 10, "shaped": Path("bench.json"), "link": "25mbit"})
    table = report(args, [1, 2], summarise(curves, step_seconds), 1.0)
    assert "| powersgd | 4.9000 | 5.1000 | 5.0000 | 0.2000 | -0.1000 | -0.1000, -0.1000 | 29 (27, 30) | 2.00 | 1.0 min | " \
           "4.72x |" in table
    assert "To the common loss 5.1000 (the highest mean final loss, which every seed-mean curve reaches): none 30 " \
           "steps, 4.5 min (1.00x); powersgd 29 steps, 1.0 min (4.72x)." in table
    with pytest.raises(UsageError, match="has no hvdbert row there; it has 1gbit, 25mbit"):
        step_seconds_at(shaped, "100mbit")
    # --target-from: a longer powersgd schedule against the earlier summary's none (5.1 at step 30)
    earlier = json.loads(json.dumps(summarise({"none": curves["none"]}, step_seconds)))
    longer = {"powersgd": [curve(7.0, 5.6, 5.2, 4.8), curve(7.0, 5.8, 5.4, 5.0)]}  # mean 7.0, 5.7, 5.3, 4.9
    summary = summarise(longer, step_seconds, earlier)
    (row,) = summary["rows"]
    assert summary["target_eval_loss"] == pytest.approx(5.1) and row["mean_difference"] == pytest.approx(-0.2)
    assert row["steps_to_target"] == pytest.approx(35.0) and row["steps_to_target_per_seed"] == [
        pytest.approx(32.5), pytest.approx(37.5)]
    assert summary["target_from"]["seconds_to_target"] == pytest.approx(270.0)
    assert row["speedup_to_target"] == pytest.approx(270.0 / 70.0)
    args.target_from = Path("earlier/quality.json")
    table = report(args, [1, 2], summary, 1.0)
    assert "Target: the none runs' mean final held-out loss in earlier/quality.json, 5.1000, which their seed-mean " \
           "curve reached at step 30 (4.5 min at 25mbit: the speed-ups' baseline)." in table
    assert "| -0.2000 | +0.0000, +0.0000 | 35 (" in table and "| 2.00 | 1.2 min | 3.86x |" in table
    assert "common loss" not in table
    # a variant: its name, then --set, then its own keys (they win)
    args.set = ["dist.powersgd_rank=4"]
    assert run_sets(args, "powersgd+dist.powersgd_rank=16", 3)[-4:] == [
        "train.seed=3", "dist.compression=powersgd", "dist.powersgd_rank=4", "dist.powersgd_rank=16"]


def test_compression_quality_refuses_bad_input_in_one_line_before_writing(cli, held_out_data, tmp_path):
    base = ["--data", held_out_data, "--output", tmp_path / "out", "--workdir", tmp_path / "runs"]
    for extra, message in ((["--compression", "none,zip"], "'zip' is not valid; choose from none, fp16, bf16, powersgd"),
                           (["--compression", "none,powersgd+rank16"], "expected NAME+SECTION.KEY=VALUE"),
                           (["--seeds", "1,x"], "expected comma-separated whole numbers"),
                           (["--steps", "600", "--eval-every", "70"], "must divide --steps 600"),
                           (["--link", "25mbit"], "--shaped and --link go together"),
                           (["--shaped", tmp_path / "none.json", "--link", "25mbit"], "no such file"),
                           (["--target-from", tmp_path / "none.json"], "--target-from"),
                           (["--target-from", held_out_data / "manifest.json"], "not a bench.compression_quality")):
        result = cli("bench.compression_quality", [*base, *extra])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    result = cli("bench.compression_quality", ["--data", tmp_path, "--output", tmp_path / "out"])
    assert result.returncode == 2 and "no held-out split" in result.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def descendants(pid: int) -> set[int]:
    """The processes below `pid`, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while listed
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_sigterm_ends_the_benchmarks_processes_and_its_temporary_directory(hvdbert_env, tmp_path):
    """A real process: a benchmark killed by SIGTERM (a job's time limit) takes the configuration it
    runs with it, and removes its hvdbert-bench-* directory."""
    import signal
    import time

    bench = subprocess.Popen([sys.executable, "-m", "hvdbert.bench", "--recipe", str(TINY), "--steps", "100000",
                              "--output", str(tmp_path / "out"), *FAST], cwd=REPO,
                             env={**hvdbert_env, "TMPDIR": str(tmp_path)}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    children: set[int] = set()
    while not children:  # the first configuration has started
        assert bench.poll() is None and time.monotonic() < deadline, bench.stderr.read()[-3000:]
        time.sleep(0.2)
        children = descendants(bench.pid)
    try:
        assert len(list(tmp_path.glob("hvdbert-bench-*"))) == 1
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 128 + signal.SIGTERM
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline + 30:
            time.sleep(0.2)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children)
        assert list(tmp_path.glob("hvdbert-bench-*")) == []
    finally:  # a failure leaves nothing running either: what still runs for this test (its path in the command)
        if bench.poll() is None:
            bench.kill()
        for pid in children:
            try:
                if str(tmp_path) in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        bench.wait()


def test_ddp_peer_registers_powersgd_and_refuses_bf16_on_gloo(monkeypatch):
    """The DDP peer on one Gloo process: dist.compression = powersgd registers DDP's PowerSGD hook at
    hvdbert's rank (the step runs through it: two plain iterations, then compressed), bf16 is refused
    in one line (DDP's bf16 hook needs NCCL)."""
    import socket

    import torch

    from hvdbert.bench.peers.ddp_model import TorchDDP
    from hvdbert.compression import Bf16Wire, PowerSGD
    from hvdbert.errors import UsageError

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for name, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    dist = TorchDDP()
    try:
        model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))
        with pytest.raises(UsageError, match="bf16_compress_hook, which needs NCCL") as error:
            dist.wrap_optimizer(None, model, 1, False, Bf16Wire(model.parameters()))
        assert "\n" not in str(error.value)
        dist.wrap_optimizer(None, model, 1, False, PowerSGD(model.parameters(), rank=2, start_step=0, seed=1))
        wrapped = dist.wrap_forward(model)
        for _ in range(3):  # iterations 0 and 1 plain, then the rank-2 factors (one worker: rank-2 of the gradient)
            model.zero_grad()
            wrapped(torch.randn(8, 32)).square().sum().backward()
        assert wrapped._get_ddp_logging_data().get("comm_hook") == "powerSGD_hook"
        assert torch.linalg.matrix_rank(model[0].weight.grad) <= 2
    finally:
        dist.shutdown()


def test_rounds_compare_each_configuration_with_plain_hvdbert_in_the_same_round():
    """--hosts with --repeats: every round's speed-ups are taken within that round (hand-computed),
    and the table gives them per round with their median."""
    from hvdbert.bench.cluster import round_ratios
    from hvdbert.bench.report import round_table

    def record(system, label, step, compression="none"):
        return {"system": system, "label": label, "step_seconds": step, "compression": compression}

    first = round_ratios(2, "100mbit", 1, [
        record("hvdbert", "hvdbert", 2.0), record("ddp-hvdbert-model", "ddp-hvdbert-model", 3.0),
        record("hvdbert", "hvdbert dist.cycle_time_ms=1", 1.6),
        record("hvdbert", "hvdbert dist.compression=fp16", 1.0, "fp16"),
        record("ddp-hvdbert-model", "ddp-hvdbert-model dist.compression=fp16", 1.5, "fp16")])
    assert first["speedup_vs_hvdbert"] == {"hvdbert": 1.0, "ddp-hvdbert-model": 2.0 / 3.0,
                                           "hvdbert dist.cycle_time_ms=1": 1.25, "hvdbert dist.compression=fp16": 2.0,
                                           "ddp-hvdbert-model dist.compression=fp16": 2.0 / 1.5}
    assert first["hvdbert_vs_ddp"] == {"hvdbert": 1.5, "hvdbert dist.cycle_time_ms=1": 3.0 / 1.6,
                                       "hvdbert dist.compression=fp16": 1.5}
    # a later round under twice the load: the ratios, not the step times, are what compare
    second = round_ratios(2, "100mbit", 2, [
        record("hvdbert", "hvdbert", 4.0), record("ddp-hvdbert-model", "ddp-hvdbert-model", 5.0),
        record("hvdbert", "hvdbert dist.cycle_time_ms=1", 4.4),
        record("hvdbert", "hvdbert dist.compression=fp16", 2.5, "fp16"),
        record("ddp-hvdbert-model", "ddp-hvdbert-model dist.compression=fp16", 2.5, "fp16")])
    table = round_table([first, second])
    row = next(line for line in table.splitlines() if "cycle_time_ms=1" in line)
    assert row == ("| 100mbit | 2 | hvdbert (Horovod) dist.cycle_time_ms=1 | 1.60, 4.40 | 1.25x, 0.91x | 0.91x | "
                   "1.88x, 1.14x (median 1.14x; ahead in 2 of 2) |")
    # level: ahead in one round of two (fp16: 1.50x, then 2.5 s against 2.5 s, not ahead)
    row = next(line for line in table.splitlines()
               if line.startswith("| 100mbit | 2 | hvdbert (Horovod) dist.compression"))
    assert row.endswith("| 1.50x, 1.00x (median 1.00x; ahead in 1 of 2) |")
    row = next(line for line in table.splitlines() if "DDP" in line.split("|")[3])
    assert row.endswith("| – |")  # the peer has no ratio against itself


def test_the_shaped_benchs_model_inputs_are_each_systems_medians():
    """bench/cluster.py: the hosts' CPU per GB and the overlap window measured per row (hand-computed),
    their medians per system over the rows without --vary, and the prediction made from them."""
    from hvdbert.bench.cluster import calibration, measured_row, model_row

    reference = {"alone_seq_per_s": 16.0, "concurrent_seq_per_s": 16.0, "concurrent_step_seconds": 2.0,
                 "concurrent_cpu_seconds_per_step": 4.0}

    def row(system, label, step, cpu, link="100mbit"):
        # 2 hosts, 10 MB sent per host and step: 0.8 s at 100 Mbit/s
        measured = {"system": system, "label": label, "workers": 2, "seq_per_s": 64 / step, "step_seconds": step,
                    "cpu_seconds_per_step": cpu, "micro_batch_size": 32, "wire_tx_bytes_per_rank_per_step": 10e6,
                    "wire_tx_packets_per_rank_per_step": 1234.0,
                    "breakdown_seconds": {"gradient_sync": 0.0}, "trainable_parameters": 2_500_000,
                    "compression": "none", "allreduce_payload_bytes_per_step": 10e6}
        return {**measured, **measured_row(measured, reference, link)}

    # 0.12 CPU-s per host above the reference for 20 MB sent and received: 6 s/GB; exposed 0.52 s of
    # 0.8 s + 0.12 s: a window of 0.4 s over a 2 s micro-batch, 0.2
    one = row("hvdbert", "hvdbert", 2.52, 4.24)
    assert one["host_cpu_seconds_per_gb"] == pytest.approx(6.0) and one["overlap_window"] == pytest.approx(0.2)
    assert one["scaling_efficiency"] == pytest.approx(2.0 / 2.52)
    rows = [one, row("hvdbert", "hvdbert", 2.62, 4.16), row("hvdbert", "hvdbert", 2.72, 4.4),
            row("hvdbert", "hvdbert dist.cycle_time_ms=1", 9.0, 9.0)]  # a variant: not an input
    inputs = calibration(rows, None)["hvdbert"]
    assert inputs["host_cpu_seconds_per_gb"] == pytest.approx(6.0)  # of 6, 4 and 10
    # windows (0.8 + 0.12 - 0.52) / 2, (0.8 + 0.08 - 0.62) / 2, (0.8 + 0.2 - 0.72) / 2
    assert inputs["overlap"] == pytest.approx(0.14)  # of 0.2, 0.13 and 0.14
    assert calibration(rows, 0.3)["hvdbert"]["overlap"] == 0.3  # --overlap given
    # the model from them: exposed max(0.5 x 0.8001, 0.8001 - 0.14 x 2) + 6 s/GB x 20 MB
    model = model_row(one, inputs, 0.5)
    assert model["predicted_step_seconds"] == pytest.approx(2.0 + 0.5201 + 0.12)
    assert model["model_error_points"] == pytest.approx(100 * (2.0 / 2.6401 - 2.0 / 2.52))
    # and the table says so
    from hvdbert.bench.report import shaped_table

    baseline = {"hosts": 2, "link": "100mbit", "alone_seq_per_s": 16.0, "concurrent_seq_per_s": 16.0,
                "load_average": [0.5, 0.5]}
    table = shaped_table([{**one, **model}], [baseline], [], {"hvdbert": inputs}, 0.5)
    assert "| 100mbit | 2 | hvdbert (Horovod) | 2.52 | 25.40 | 0.00 | 0.52 | 0.80 | 0.35 | 6.00 | 10.0 (10.0) | " \
           "1,234 |" in table
    assert "hvdbert (Horovod): overlap 0.14, host CPU 6.00 s/GB; the input embeddings' share of the gradient, 0.500." \
        in table


def test_step_levers_divides_each_round_by_its_own_baseline():
    """bench/step_levers.py: speed-ups and the hvdbert/Trainer ratio are taken within a round
    (hand-computed), the table gives the median and range over rounds, and a first lever with
    settings (no baseline to divide by) is refused."""
    from bench.step_levers import parse_levers, report, summarise
    from hvdbert.errors import UsageError

    levers = parse_levers(["baseline=", "bf16=train.precision=bf16,model.attention_probs_dropout_prob=0.0"])
    assert levers == [("baseline", []), ("bf16", ["train.precision=bf16", "model.attention_probs_dropout_prob=0.0"])]
    rounds = [{"baseline": {"hvdbert": 1.2, "hf": 2.4}, "bf16": {"hvdbert": 0.8, "hf": 2.0}},
              {"baseline": {"hvdbert": 1.5, "hf": 2.5}, "bf16": {"hvdbert": 1.0, "hf": 2.0}}]
    baseline, bf16 = summarise(levers, rounds)
    assert baseline["speedup"] == {"hvdbert": [1.0, 1.0], "hf": [1.0, 1.0]}
    assert bf16["speedup"]["hvdbert"] == pytest.approx([1.5, 1.5])
    assert bf16["speedup"]["hf"] == pytest.approx([1.2, 1.25])
    assert bf16["ratio"]["hvdbert/hf"] == pytest.approx([0.4, 0.5])
    args = type("Args", (), {"argv": ["--recipe", "R"], "rounds": 2, "steps": 8, "warmup_steps": 3})
    table = report(args, [baseline, bf16], 60.0)
    assert "| bf16 | 0.900 (0.800-1.000) | 2.000 (2.000-2.000) | 1.50x (1.50-1.50) | 1.23x (1.20-1.25) | " \
           "0.45 (0.40-0.50) |" in table
    with pytest.raises(UsageError, match="the first --lever is the baseline"):
        parse_levers(["bf16=train.precision=bf16"])


def test_step_levers_refuses_a_bad_lever_in_one_line_before_writing_anything(cli, tmp_path):
    output = tmp_path / "levers"
    result = cli("bench.step_levers", ["--recipe", TINY, "--output", output, "--lever", "bf16=train.precision=bf16"])
    assert result.exit_and_stderr_lines() == (2, [
        "bench.step_levers: error: the first --lever is the baseline the others are divided by: give it no "
        "settings (--lever baseline=)"])
    assert not output.exists()


def test_the_trainer_gets_the_levers_hvdbert_s_recipe_sets(tmp_path):
    """The Trainer of the HF peer and of time_to_quality runs a recipe's bf16 autocast and
    torch.compile as hvdbert does (TrainingArguments accepts them on this CPU), and fp32 eager
    without them."""
    from transformers import TrainingArguments

    from hvdbert.bench.peers.data import trainer_levers

    levered = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **trainer_levers("bf16", True))
    assert levered.bf16 and not levered.fp16 and levered.torch_compile
    plain = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **trainer_levers("fp32", False))
    assert not (plain.bf16 or plain.fp16 or plain.torch_compile)


# `perf script -F comm,pid,tid,time,ip,sym,dso` as it prints a system-wide record: the idle task, a
# worker's main thread and its communication threads (one named by its program, gloo_tcp_loop), a
# command name with a space, and sshd, which is not a worker.
PERF_SCRIPT = """\
         swapper     0/0     100.000000:  ffffffff8100 pv_native_safe_halt+0x1 ([kernel.kallsyms])
          python   500/500   100.500000:  7f00 mkl_blas_sgemm+0x10 (/x/libtorch_cpu.so)
          python   500/500   101.000000:  7f00 mkl_blas_sgemm+0x10 (/x/libtorch_cpu.so)
          python   500/512   101.200000:  7f00 epoll_wait+0x5 (/usr/lib/libc.so.6)
          python   500/512   101.300000:  ffffffff8200 ep_send_events+0x9 ([kernel.kallsyms])
          python   500/512   101.400000:  7f00 epoll_wait+0x5 (/usr/lib/libc.so.6)
   gloo_tcp_loop   600/601   101.500000:  7f00 gloo::sum<c10::Half>+0x3 (/x/libtorch_cpu.so)
          python   600/600   101.600000:  7f00 mkl_blas_sgemm+0x10 (/x/libtorch_cpu.so)
 Web Content     700/700     101.700000:  7f00 js::Run+0x1 (/x/libxul.so)
            sshd   800/800   101.800000:  ffffffff8300 tcp_sendmsg+0x2 ([kernel.kallsyms])
          python   500/500   105.000000:  7f00 mkl_blas_sgemm+0x10 (/x/libtorch_cpu.so)
"""


def test_thread_cpu_counts_each_workers_threads_in_the_window():
    from bench.thread_cpu import parse_perf_script, report, thread_cpu

    samples = parse_perf_script(PERF_SCRIPT.splitlines())
    assert len(samples) == 11 and samples[8].comm == "Web Content" and samples[6].symbol == "gloo::sum<c10::Half>"
    # 0.5 s to 4 s after the first sample: the last sample (5 s) and the idle one (0 s) fall outside
    processes, idle, total = thread_cpu(samples, 0.5, 4.0)
    assert (idle, total) == (0, 9) and sorted(processes) == [500, 600]
    worker = processes[500]
    assert worker.main == 2 and worker.other() == 3
    assert worker.threads[(512, "python")] == {"epoll_wait": 2, "ep_send_events": 1}
    assert processes[600].threads[(601, "gloo_tcp_loop")]["gloo::sum<c10::Half>"] == 1
    assert sorted(thread_cpu(samples, 0.0, None, everything=True)[0]) == [500, 600, 700, 800]
    table = report(processes, idle, total, top=1)
    assert "| 500 | 2 | 3 | python 512: 3 (epoll_wait 2) |" in table
    assert "all main threads 3 samples, all other threads 4 (57.1% of the workers' samples)" in table


@pytest.mark.skipif(shutil.which("perf") is None, reason="needs perf (Debian: linux-perf)")
def test_thread_cpu_reads_a_real_perf_record(tmp_path):
    """A process whose second thread spins shows that thread apart from its main thread.

    The thread spins for 1.5 s of its own CPU time, not of the clock, so a loaded machine
    stretches the run instead of thinning the samples."""
    data = tmp_path / "perf.data"
    spinner = ("import threading, time\n"
               "def spin():\n    while time.thread_time() < 1.5: pass\n"
               "t = threading.Thread(target=spin); t.start(); time.sleep(0.2); t.join()\n"
               "import os; print(os.getpid())")
    record = subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", "499", "-a", "-o", str(data), "--",
                             sys.executable, "-c", spinner], capture_output=True, text=True, timeout=120)
    assert record.returncode == 0, record.stderr[-2000:]
    result = subprocess.run([sys.executable, "-m", "bench.thread_cpu", str(data), "--all"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # the spinner's row (by its pid: perf -a records the machine's other processes too): few
    # main-thread samples, most of 1.5 CPU-s x 499 Hz in its other thread
    pid = record.stdout.split()[-1]
    (row,) = [line.split("|") for line in result.stdout.splitlines() if line.startswith(f"| {pid} |")]
    assert int(row[3]) > 400 and int(row[2]) < 200, result.stdout


@pytest.mark.parametrize("args, expected", [
    (["nosuch.data"], "nosuch.data: no such file"),
    (["README.md", "--from", "5", "--to", "2"], "--to 2 is not after --from 5"),
])
def test_thread_cpu_refuses_bad_input_in_one_line(args, expected):
    result = subprocess.run([sys.executable, "-m", "bench.thread_cpu", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr
