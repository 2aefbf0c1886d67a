"""README's commands: shell blocks parse, the scaling table is what hvdbert.plan says, and the
one-machine walkthrough runs as written. (`make demo` and `make test` are run by .ci/run.)"""
from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from conftest import BIN, REPO
from hvdbert.config import load_recipe
from hvdbert.plan import make_plan

README = (REPO / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"(<!-- readme-test: run -->\n)?```bash\n(.*?)```", re.S)
BASH_BLOCKS = [(bool(marker), body) for marker, body in BLOCK.findall(README)]


def test_readme_has_shell_blocks_and_one_runnable_walkthrough():
    assert len(BASH_BLOCKS) >= 5
    assert sum(run for run, _ in BASH_BLOCKS) == 1


@pytest.mark.parametrize("body", [body for _, body in BASH_BLOCKS])
def test_shell_block_parses(body):
    result = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("body", [body for _, body in BASH_BLOCKS])
def test_shell_block_names_real_modules_scripts_and_recipes(body):
    for module in re.findall(r"python -m (hvdbert(?:\.\w+)+)", body):
        path = REPO / module.replace(".", "/")
        assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), module
    for path in re.findall(r"(?<![\w/])((?:launch|recipes|bench/recipes)/[\w.-]+)", body):
        assert (REPO / path).exists(), path


def test_scaling_table_is_what_plan_resolves():
    rows = re.findall(r"^\| `(bert-[\w-]+)` \| (\d+) \| (.*) \|$", README, re.M)
    assert len(rows) == 12
    for name, workers, rest in rows:
        plan = make_plan(load_recipe(REPO / "recipes" / f"{name}.toml"), int(workers))
        expected = [plan.global_batch_size, plan.micro_batch_size, plan.accumulation_steps, f"{plan.lr:g}",
                    plan.warmup_steps, plan.max_steps, plan.max_seq_len, plan.max_predictions_per_seq]
        assert [cell.strip() for cell in rest.split("|")] == [str(v) for v in expected], name


@pytest.mark.multiprocess
def test_one_machine_walkthrough_runs_as_written(tmp_path, hvdbert_env):
    body = next(body for run, body in BASH_BLOCKS if run)
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    env = dict(hvdbert_env, PATH=f"{BIN}{os.pathsep}{hvdbert_env['PATH']}", HF_HUB_OFFLINE="1")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((tmp_path / "data/tiny/manifest.json").read_text())
    assert manifest["seq_len"] == 64 and manifest["num_sequences"] > 1000
    metrics = [json.loads(line) for line in (tmp_path / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 40 and metrics[-1]["workers"] == 2
    assert (tmp_path / "hf/tiny/model.safetensors").is_file()
    predictions = result.stdout.strip().splitlines()[-1]
    assert predictions.count("'score'") == 5  # fill-mask's top 5




def test_make_demo_trains_2500_steps_unless_told_steps():
    """`make demo` trains 2500 steps of recipes/tiny.toml (a model the probe can read); `make demo STEPS=N` N."""
    def demo_command(*variables):
        result = subprocess.run(["make", "-n", "demo", *variables], cwd=REPO, capture_output=True, text=True, check=True)
        return result.stdout[result.stdout.index("hvdbert.pretrain"):]

    assert "train.max_steps=2500" in demo_command().split()
    assert "train.max_steps=300" in demo_command("STEPS=300").split()
