"""Recipes: inheritance, overrides, validation, and the scaling plan for a worker count."""
from __future__ import annotations

import json
import time

import pytest

from conftest import REPO, Outcome, run_main_captured
from hvdbert.config import load_recipe
from hvdbert.errors import UsageError
from hvdbert.plan import make_plan

RECIPES = REPO / "recipes"


def plan_cli(*args: str) -> Outcome:
    """hvdbert.plan in this process (the launchers' tests run it as a real process)."""
    return run_main_captured("hvdbert.plan", list(args))


def test_bert_large_phase1_at_8_workers_reproduces_nvidia():
    result = plan_cli("--recipe", str(RECIPES / "bert-large-phase1.toml"), "--workers", "8", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["global_batch_size"] == 65536
    assert plan["lr"] == pytest.approx(6e-3)
    assert plan["max_steps"] == 7038
    assert plan["warmup_steps"] == round(0.2843 * 7038) == 2001
    assert plan["max_seq_len"] == 128
    assert plan["max_predictions_per_seq"] == 20
    assert plan["micro_batch_size"] * plan["accumulation_steps"] * 8 == 65536
    assert load_recipe(RECIPES / "bert-large-phase1.toml").optim.name == "lamb"


def test_bert_large_phase2_at_8_workers_reproduces_nvidia():
    recipe = load_recipe(RECIPES / "bert-large-phase2.toml")
    plan = make_plan(recipe, 8)
    assert (plan.global_batch_size, plan.lr, plan.max_steps) == (32768, pytest.approx(4e-3), 1563)
    assert plan.warmup_steps == round(0.128 * 1563) == 200
    assert (plan.max_seq_len, plan.max_predictions_per_seq) == (512, 80)
    assert recipe.optim.name == "lamb"
    assert recipe.model["num_hidden_layers"] == 24 and recipe.model["hidden_size"] == 1024


@pytest.mark.parametrize("name", ["bert-base-phase1", "bert-base-phase2", "bert-large-phase1",
                                  "bert-large-phase2", "tiny"])
def test_every_shipped_recipe_resolves(name):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    plan = make_plan(recipe, recipe.batch.reference_workers)
    assert plan.micro_batch_size * plan.accumulation_steps * plan.workers == plan.global_batch_size


def test_fixed_global_keeps_batch_and_lr_and_recomputes_accumulation():
    recipe = load_recipe(RECIPES / "bert-large-phase1.toml")
    for workers, accumulation in [(8, 128), (64, 16), (256, 4), (1024, 1)]:
        plan = make_plan(recipe, workers)
        assert (plan.global_batch_size, plan.accumulation_steps, plan.lr) == (65536, accumulation, 6e-3)


@pytest.mark.parametrize("rule, factor, warmup_steps", [("linear", 4.0, 10), ("sqrt", 2.0, 40), ("none", 1.0, 10)])
def test_per_worker_scales_batch_lr_steps_and_warmup(rule, factor, warmup_steps):
    recipe = load_recipe(RECIPES / "tiny.toml", [
        "batch.scaling=per-worker", f"optim.lr_scaling={rule}", "batch.reference_workers=2",
        "train.max_steps=400", "optim.warmup_proportion=0.1",
    ])
    reference = make_plan(recipe, 2)
    plan = make_plan(recipe, 8)  # 4x the reference workers
    assert plan.global_batch_size == 4 * reference.global_batch_size
    assert plan.accumulation_steps == reference.accumulation_steps
    assert plan.lr == pytest.approx(reference.lr * factor)
    # the same number of samples
    assert plan.max_steps == 100 and reference.max_steps == 400
    # warmup over the same samples (Goyal et al. 2017), or, for LAMB's sqrt rule, the same steps
    # (You et al. 2019)
    assert plan.warmup_steps == warmup_steps and reference.warmup_steps == 40


# Hand-computed: bert-large-phase1's 6e-3 belongs to 65536; 4096 is 1/16 of it.
@pytest.mark.parametrize("rule, lr", [
    ("sqrt", 6e-3 / 4),  # 6e-3 x sqrt(4096 / 65536) = 6e-3 x 1/4 = 1.5e-3
    ("linear", 6e-3 / 16),  # 6e-3 x 4096 / 65536 = 3.75e-4
    ("none", 6e-3),
    ("auto", 6e-3 / 4),  # LAMB: sqrt
])
def test_a_changed_global_batch_derives_the_rate_by_the_rule(rule, lr):
    recipe = load_recipe(RECIPES / "bert-large-phase1.toml",
                         ["batch.global_batch_size=4096", f"optim.lr_scaling={rule}"])
    plan = make_plan(recipe, 8)
    assert plan.lr == pytest.approx(lr, rel=1e-12)
    assert (plan.reference_lr, plan.reference_global_batch_size) == (6e-3, 65536)
    # the run asked for keeps its steps and warmup
    assert (plan.global_batch_size, plan.max_steps, plan.warmup_steps) == (4096, 7038, 2001)


def test_auto_rule_is_linear_for_adamw_and_the_reference_is_the_files_batch(tmp_path):
    # a recipe that names no reference: its rate belongs to the global batch its file states (48)
    (tmp_path / "mine.toml").write_text('[batch]\nglobal_batch_size = 48\nmicro_batch_size = 8\n'
                                        '[optim]\nname = "adamw"\nlr = 6e-4\n')
    plan = make_plan(load_recipe(tmp_path / "mine.toml", ["batch.global_batch_size=16"]), 1)
    assert (plan.lr_scaling, plan.reference_global_batch_size) == ("linear", 48)
    assert plan.lr == pytest.approx(2e-4, rel=1e-12)  # 6e-4 x 16 / 48
    as_written = make_plan(load_recipe(tmp_path / "mine.toml"), 1)
    assert as_written.lr == 6e-4 and as_written.lr_derivation.startswith("0.0006, the rate at its reference")


def test_worker_count_alone_changes_nothing_but_accumulation():
    recipe = load_recipe(RECIPES / "bert-large-phase1.toml", ["batch.global_batch_size=4096"])
    plans = [make_plan(recipe, workers).to_dict() for workers in (1, 2, 8, 64)]
    for plan in plans:
        assert plan["micro_batch_size"] * plan["accumulation_steps"] * plan["workers"] == 4096
        assert plan["lr"] == pytest.approx(1.5e-3, rel=1e-12)
    unchanged = [{k: v for k, v in p.items() if k not in ("workers", "accumulation_steps")} for p in plans]
    assert all(p == unchanged[0] for p in unchanged)


def test_powersgd_with_adamw_runs_with_one_warning_line_that_names_the_measurement():
    """PowerSGD with AdamW stayed on BERT's early plateau more often than uncompressed training
    (docs/compression.md): plan says so in one line and plans it; with LAMB, or uncompressed, nothing."""
    args = ["--recipe", str(RECIPES / "tiny.toml"), "--workers", "2", "--set", "dist.compression=powersgd"]
    result = plan_cli(*args, "--set", "optim.name=adamw")
    assert result.returncode == 0, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("hvdbert: warning: dist.compression = powersgd with optim.name = adamw stayed on")
    assert "docs/compression.md" in line and "optim.name = lamb" in line
    assert plan_cli(*args).stderr == "" and plan_cli(*args[:4], "--set", "optim.name=adamw").stderr == ""


def test_none_keeps_the_rate_and_says_so_in_one_warning_line():
    args = ["--recipe", str(RECIPES / "bert-large-phase1.toml"), "--workers", "8",
            "--set", "batch.global_batch_size=4096", "--set", "optim.lr_scaling=none"]
    result = plan_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["lr"] == 6e-3
    assert result.stderr.strip().splitlines() == [
        "hvdbert: warning: optim.lr = 0.006 belongs to a global batch of 65536, this plan's is 4096; "
        "optim.lr_scaling = none keeps it (sqrt or linear would derive one)"]
    # at the reference batch, or under a rule that derives the rate, nothing is said
    assert plan_cli(*args[:4], "--set", "optim.lr_scaling=none").stderr == ""
    assert plan_cli(*args[:6]).stderr == ""


def test_plan_text_shows_rule_reference_and_derived_rate():
    result = plan_cli("--recipe", str(RECIPES / "bert-large-phase1.toml"), "--workers", "8",
                      "--set", "batch.global_batch_size=4096")
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert (rows["lr"], rows["lr_scaling"], rows["reference_lr"], rows["reference_global_batch_size"]) == (
        "0.0015", "sqrt", "0.006", "65536")
    assert rows["lr_derivation"] == "0.006 x sqrt(4096 / 65536) = 0.0015 (sqrt)"


def test_inheritance_merges_deeply_and_child_wins(tmp_path):
    (tmp_path / "base.toml").write_text('[train]\nmax_steps = 5\nseed = 7\n[model]\nhidden_size = 96\n')
    (tmp_path / "child.toml").write_text('inherit = ["base.toml"]\n[train]\nseed = 9\n')
    recipe = load_recipe(tmp_path / "child.toml", ["train.log_every=3"])
    assert (recipe.train.max_steps, recipe.train.seed, recipe.train.log_every) == (5, 9, 3)
    assert recipe.model == {"hidden_size": 96}


def test_inheritance_cycle_is_an_error(tmp_path):
    (tmp_path / "a.toml").write_text('inherit = ["b.toml"]\n')
    (tmp_path / "b.toml").write_text('inherit = ["a.toml"]\n')
    with pytest.raises(UsageError, match="cycle"):
        load_recipe(tmp_path / "a.toml")


def test_override_types_are_checked():
    recipe = load_recipe(RECIPES / "tiny.toml", ["optim.lr=3", "optim.name=adamw", "dist.fp16_allreduce=true"])
    assert recipe.optim.lr == 3.0 and isinstance(recipe.optim.lr, float)
    assert recipe.optim.name == "adamw" and recipe.dist.fp16_allreduce is True
    with pytest.raises(UsageError, match="train.max_steps = 'many' has the wrong type; expected an integer"):
        load_recipe(RECIPES / "tiny.toml", ["train.max_steps=many"])
    with pytest.raises(UsageError, match="choose one of lamb, adamw"):
        load_recipe(RECIPES / "tiny.toml", ["optim.name=sgd"])


@pytest.mark.parametrize("args, expected", [
    (["--recipe", "recipes/tiny.toml", "--workers", "2", "--set", "train.max_step=3"],
     "unknown key train.max_step; did you mean train.max_steps?"),
    (["--recipe", "recipes/tiny.toml", "--workers", "2", "--set", "model.hidden_sise=3"],
     "unknown key model.hidden_sise; did you mean model.hidden_size?"),
    (["--recipe", "recipes/tiny.toml", "--workers", "2", "--set", "batch.micro_batch_size=1.5"],
     "batch.micro_batch_size = 1.5 has the wrong type; expected an integer"),
    (["--recipe", "recipes/bert-large-phase1.toml", "--workers", "7"],
     "7 workers cannot split batch.global_batch_size = 65536 into micro-batches of 64 (1024 per step is "
     "not divisible by 7); worker counts that work nearby: 4 or 8"),
    (["--recipe", "recipes/no-such.toml", "--workers", "2"], "recipe file not found"),
    (["--recipe", "recipes/tiny.toml", "--workers", "two"], "argument --workers: invalid int value"),
])
def test_bad_input_is_one_line_and_exit_2(args, expected):
    result = plan_cli(*args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_cycle_time_is_chosen_by_device_unless_set():
    from hvdbert.config import DistConfig
    from hvdbert.dist import cycle_time_ms

    assert cycle_time_ms(DistConfig()) == 10.0  # this machine has no CUDA: CPU/Gloo's 10 ms
    assert cycle_time_ms(DistConfig(cycle_time_ms=2.5)) == 2.5
    assert load_recipe(RECIPES / "bert-large-phase1.toml").dist.cycle_time_ms == 0.0
    with pytest.raises(UsageError, match="dist.cycle_time_ms = -1.0 must be 0"):
        load_recipe(RECIPES / "tiny.toml", ["dist.cycle_time_ms=-1"])


@pytest.mark.parametrize("sets, workers, expected", [
    # each of these searched every worker count up to the micro-batch count: minutes, or forever
    (["batch.global_batch_size=1600000000016"], 2,
     "batch.global_batch_size = 1600000000016 must be from 1 to 16777216"),
    (["batch.global_batch_size=100000000000000000000000", "batch.micro_batch_size=1"], 3,
     "batch.global_batch_size = 100000000000000000000000 must be from 1 to 16777216"),
    (["batch.micro_batch_size=1", "optim.reference_global_batch_size=99999999999"], 1,
     "optim.reference_global_batch_size = 99999999999 must be 0"),
    ([], 10**30, "worker count 1000000000000000000000000000000 must be from 1 to 1048576"),
    (["batch.scaling=per-worker", "batch.global_batch_size=65536", "batch.micro_batch_size=64"], 1048576,
     "1048576 workers grow batch.global_batch_size = 65536 (batch.scaling = per-worker, "
     "batch.reference_workers = 2) to 34359738368 sequences per step, beyond the largest, 16777216"),
])
def test_absurd_sizes_are_refused_in_one_line_at_once(cli, sets, workers, expected):
    start = time.monotonic()
    status, err = cli("hvdbert.plan", ["--recipe", RECIPES / "tiny.toml", "--workers", workers,
                      *[arg for key in sets for arg in ("--set", key)]]).exit_and_stderr_lines()
    assert (status, len(err)) == (2, 1) and expected in err[0], err
    assert time.monotonic() - start < 5


def test_the_nearest_workable_worker_counts_are_found_at_the_largest_batch():
    start = time.monotonic()
    largest = load_recipe(RECIPES / "tiny.toml", ["batch.global_batch_size=16777213", "batch.micro_batch_size=1"])
    with pytest.raises(UsageError, match="worker counts that work nearby: 1$") as refused:
        make_plan(largest, 2)  # 16777213 is prime, and more workers than any job has
    with pytest.raises(UsageError, match="nearby: 3 or 5$"):
        make_plan(load_recipe(RECIPES / "tiny.toml", ["batch.global_batch_size=16777215",  # 3^2 x 5 x 7 x 13 x 17 x 241
                                                      "batch.micro_batch_size=1"]), 4)
    assert time.monotonic() - start < 5, refused


@pytest.mark.parametrize("key, value, expected", [
    ("train.max_steps", "99999999999999999999999", "train.max_steps = 99999999999999999999999 must be from 1 to 1000000000"),
    ("checkpoint.every_steps", "10000000000", "checkpoint.every_steps = 10000000000 must be from 1 to 1000000000"),
    ("optim.lr", "1" + "0" * 400, "optim.lr = 1" + "0" * 400 + " is not a finite number"),
])
def test_out_of_range_integers_are_refused_not_rounded(cli, key, value, expected):
    status, err = cli("hvdbert.plan", ["--recipe", RECIPES / "tiny.toml", "--workers", 2,
                                       "--set", f"{key}={value}"]).exit_and_stderr_lines()
    assert (status, len(err)) == (2, 1) and err[0].endswith(expected), err


def test_per_worker_step_counts_are_exact_integers():
    # 68482387 x 496 / 509 = 66733328 exactly; through floats (x / (509 / 496)) it came out 66733329
    recipe = load_recipe(RECIPES / "tiny.toml", ["batch.scaling=per-worker", "batch.reference_workers=496",
                                                 "batch.global_batch_size=496", "batch.micro_batch_size=1",
                                                 "train.max_steps=68482387", "optim.lr_scaling=linear"])
    plan = make_plan(recipe, 509)
    assert plan.max_steps == -(-68482387 * 496 // 509) == 66733328
    assert plan.warmup_steps == -(-round(recipe.optim.warmup_proportion * 68482387) * 496 // 509)


@pytest.mark.parametrize("override, expected", [
    ("optim.beta2=1.0", "optim.beta2 = 1.0 must be in [0, 1)"),  # StableAdamW divided by 1 - beta2
    ("optim.beta1=1.5", "optim.beta1 = 1.5 must be in [0, 1)"),
    ("optim.end_lr=-0.02", "optim.end_lr = -0.02 must be 0 or more"),  # trained with a negative rate
    ("optim.weight_decay=-1", "optim.weight_decay = -1.0 must be 0 or more"),
    ("optim.eps=0", "optim.eps = 0.0 must be greater than 0"),
    ("optim.decay_power=-1", "optim.decay_power = -1.0 must be 0 (hold the peak rate) or more"),
    ("train.max_bad_steps=-1", "train.max_bad_steps = -1 must be from 0 to 1000000000"),
    ("train.grad_clip_norm=-1", "train.grad_clip_norm = -1.0 must be 0 (no clipping) or more"),
    ("train.seed=-1", "train.seed = -1 must be from 0 to 9223372036854775807"),
    ("data.prefetch_batches=0", "data.prefetch_batches = 0 must be from 1 to 1024"),
    ("dist.threads_per_worker=100000", "dist.threads_per_worker = 100000 must be from 1 to 4096"),
    ("dist.fusion_threshold_mb=-1", "dist.fusion_threshold_mb = -1 must be from 0 to 65536"),
])
def test_numeric_keys_outside_their_range_are_refused(override, expected):
    with pytest.raises(UsageError) as refused:
        load_recipe(RECIPES / "tiny.toml", [override])
    assert str(refused.value) == f"--set {override}: {expected}"


def test_every_numeric_key_declares_its_range_next_to_its_field():
    import dataclasses

    from hvdbert.config import _SECTION_CLASSES

    unranged = [f"{section}.{spec.name}" for section, cls in _SECTION_CLASSES.items()
                for spec in dataclasses.fields(cls)
                if spec.type in ("int", "float") and "valid" not in spec.metadata]
    assert unranged == []


def test_a_shorter_sequence_alone_derives_its_predictions_cap():
    # modernbert-base: 308 predictions for 1024 tokens; at 64 that was a broadcast error in masking
    recipe = load_recipe(RECIPES / "modernbert-base.toml", ["data.max_seq_len=64"])
    assert recipe.data.max_predictions_per_seq == 20  # 0.3 x 64 = 19.2, rounded up
    assert load_recipe(RECIPES / "tiny.toml", ["data.max_seq_len=30", "data.mask_prob=0.1"]
                       ).data.max_predictions_per_seq == 3  # exactly 0.1 x 30
    assert load_recipe(RECIPES / "modernbert-base.toml").data.max_predictions_per_seq == 308  # as written
    with pytest.raises(UsageError) as refused:
        load_recipe(RECIPES / "modernbert-base.toml", ["data.max_seq_len=64", "data.max_predictions_per_seq=100"])
    assert str(refused.value) == (
        "--set data.max_predictions_per_seq=100: data.max_predictions_per_seq = 100 exceeds data.max_seq_len = 64; "
        "set data.max_predictions_per_seq to at most 64, e.g. 20 (data.mask_prob x data.max_seq_len, rounded up)")
