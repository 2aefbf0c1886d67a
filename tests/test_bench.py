"""`python -m hvdbert.bench`: a real small run at 1 and 2 Horovod workers (no timing assertions)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import FAST, TINY, run_module
from hvdbert.bench import training_flops_per_sequence

BREAKDOWN = ("data_wait", "forward_backward", "gradient_sync", "optimizer")


@pytest.fixture(scope="module")
def bench_run(hvdbert_env, tmp_path_factory):
    output = tmp_path_factory.mktemp("bench")
    result = run_module("hvdbert.bench", [
        "--recipe", str(TINY), "--workers", "1,2", "--steps", "3", "--warmup-steps", "1",
        "--vary", "dist.fp16_allreduce=true", "--output", str(output), "--json", str(output / "top.json"),
        *FAST,
    ], hvdbert_env, timeout=300)
    return output, result


def test_json_has_the_contract_fields(bench_run):
    output, _ = bench_run
    top = json.loads((output / "top.json").read_text())
    assert top["workers"] == 2
    for key in ("seq_per_s", "tokens_per_s", "mfu", "step_seconds"):
        assert math.isfinite(top[key]) and top[key] > 0, key
    assert set(top["breakdown_seconds"]) == set(BREAKDOWN)
    assert top == json.loads((output / "bench.json").read_text())
    (round_,) = top["rounds"]  # one repeat: one round, with the 2-worker efficiency computed in it
    assert round_["ratios"]["scaling_efficiency hvdbert x2"] == pytest.approx(top["scaling_efficiency"])


def test_every_row_is_positive_and_its_breakdown_sums_to_the_step(bench_run):
    output, _ = bench_run
    rows = json.loads((output / "bench.json").read_text())["rows"]
    assert sorted((r["label"], r["workers"]) for r in rows) == [
        ("hvdbert", 1), ("hvdbert", 2), ("hvdbert dist.fp16_allreduce=true", 2)]
    for row in rows:
        for key in ("seq_per_s", "tokens_per_s", "mfu", "step_seconds", "peak_memory_bytes", "peak_flops"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["label"], key)
        assert 0 < row["mfu"] < 1
        # packed sequences have no padding: every token is real
        assert row["tokens_per_s"] == pytest.approx(row["seq_per_s"] * row["seq_len"], rel=1e-6)
        breakdown = row["breakdown_seconds"]
        assert all(v >= 0 for v in breakdown.values())
        # the four phases cover the step; only loop bookkeeping falls outside them
        assert sum(breakdown.values()) == pytest.approx(row["step_seconds"], rel=0.10)
    single = next(r for r in rows if r["workers"] == 1)
    # one process: nothing to reduce, only the two clock reads around the no-op synchronize
    assert single["breakdown_seconds"]["gradient_sync"] < 0.2 * single["step_seconds"]
    assert single["scaling_efficiency"] == 1.0


def test_fp16_allreduce_halves_the_counted_bytes(bench_run):
    output, _ = bench_run
    rows = {(r["label"], r["workers"]): r for r in json.loads((output / "bench.json").read_text())["rows"]}
    fp32, fp16 = rows[("hvdbert", 2)], rows[("hvdbert dist.fp16_allreduce=true", 2)]
    assert fp32["allreduce_payload_bytes_per_step"] == 4 * fp32["trainable_parameters"]
    assert fp16["allreduce_payload_bytes_per_step"] * 2 == fp32["allreduce_payload_bytes_per_step"]
    assert fp32["allreduce_wire_bytes_per_rank_per_step"] == fp32["allreduce_payload_bytes_per_step"]  # 2(N-1)/N
    assert rows[("hvdbert", 1)]["allreduce_payload_bytes_per_step"] == 0


def test_table_and_plot_are_written(bench_run):
    output, result = bench_run
    table = (output / "bench.md").read_text()
    assert table.count("\n") == 2 + 3  # header, rule, one line per row
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


def test_bad_flags_are_one_line_errors(hvdbert_env):
    result = run_module("hvdbert.bench", ["--recipe", str(TINY), "--workers", "two"], hvdbert_env, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "--workers" in result.stderr
    result = run_module("hvdbert.bench", ["--recipe", str(TINY), "--peers", "deepspeed"], hvdbert_env, check=False)
    assert result.returncode == 2 and "deepspeed" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the search runs")
def test_find_max_batch_says_it_needs_a_gpu(hvdbert_env):
    result = run_module("hvdbert.bench", ["--recipe", str(TINY), "--find-max-batch", *FAST], hvdbert_env,
                        check=False)
    assert result.returncode == 2 and "CUDA" in result.stderr


def test_ddp_peer_runs_hvdbert_step_from_outside_the_repository(hvdbert_env, tmp_path):
    """--peers from any directory (the peers are modules of the installed package), and the DDP peer
    on hvdbert's model computes hvdbert's losses step by step: only the communication layer differs."""
    result = subprocess.run([sys.executable, "-m", "hvdbert.bench", "--recipe", str(TINY), "--workers", "1,2",
                             "--steps", "3", "--warmup-steps", "1", "--peers", "ddp-hvdbert-model",
                             "--output", "out", *FAST], cwd=tmp_path, env=hvdbert_env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r["system"], r["workers"]): r for r in json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]}
    assert set(rows) == {("hvdbert", 1), ("hvdbert", 2), ("ddp-hvdbert-model", 1), ("ddp-hvdbert-model", 2)}
    for workers in (1, 2):
        ours, theirs = rows[("hvdbert", workers)], rows[("ddp-hvdbert-model", workers)]
        assert theirs["backend"] == "torch-ddp-gloo" and theirs["global_batch_size"] == ours["global_batch_size"]
        assert len(ours["step_losses"]) == len(theirs["step_losses"]) == 4
        assert max(abs(a - b) for a, b in zip(ours["step_losses"], theirs["step_losses"])) <= 1e-5
        assert ours["vs_ddp-hvdbert-model"] == pytest.approx(ours["seq_per_s"] / theirs["seq_per_s"])
    assert "vs DDP, same model" in (tmp_path / "out" / "bench.md").read_text()


def test_run_mlm_peers_refuse_another_corpus(hvdbert_env, tmp_path):
    result = run_module("hvdbert.bench", ["--recipe", str(TINY), "--data", str(tmp_path), "--peers", "hf"],
                        hvdbert_env, check=False)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "ddp-hvdbert-model" in result.stderr
