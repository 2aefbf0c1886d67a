"""ModernBERT (model.architecture = modernbert): recipes and plan, the [model] checks, the gather-first
loss, the WSD schedule, and real runs under horovodrun: 2 workers equal 1 worker with accumulation,
exact resume (also on another worker count), and an export that transformers' fill-mask loads."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, read_metrics, run_main_captured, run_module
from hvdbert import checkpoint
from hvdbert.config import load_recipe
from hvdbert.errors import UsageError
from hvdbert.model import build_model, pretraining_loss
from hvdbert.optim import lr_at
from hvdbert.plan import make_plan

RECIPES = REPO / "recipes"
BASE = RECIPES / "modernbert-base.toml"
# A tiny ModernBERT on the base recipe: three layers (one global, two sliding-window of 32 < 64
# tokens), the embedded corpus's 4096-token vocabulary, fp32, no dropout (ModernBERT's default).
TINY_SHAPE = [f"--set={item}" for item in (
    "model.vocab_size=4096", "model.hidden_size=128", "model.num_hidden_layers=3", "model.num_attention_heads=2",
    "model.intermediate_size=256", "model.max_position_embeddings=128", "model.local_attention=32",
    "data.max_seq_len=64", "data.max_predictions_per_seq=20", "batch.global_batch_size=32",
    "batch.micro_batch_size=16", "batch.reference_workers=2", "train.precision=fp32", "optim.lr=3e-3",
    "optim.reference_global_batch_size=32",  # the rate is set for this batch, not derived from 4608's
)]
SHORT = FAST + TINY_SHAPE + ["--set", "train.max_steps=8", "--set", "train.log_every=1",
                             "--set", "checkpoint.every_steps=4", "--set", "checkpoint.keep=5"]


# ------------------------------------------------------------------------------------------------
# Recipes and plan


@pytest.mark.parametrize("name, expected", [
    # AnswerDotAI/ModernBERT, branch pretraining_documentation, yamls/modernbert/*.yaml at 8 GPUs:
    # global_train_batch_size, device_train_microbatch_size, optimizer.lr, max_seq_len; steps =
    # max_duration (tokens) / (global batch x max_seq_len) rounded up; warmup = t_warmup likewise.
    ("modernbert-base", dict(global_batch_size=4608, micro_batch_size=96, accumulation_steps=6, lr=8e-4,
                             warmup_steps=math.ceil(3e9 / (4608 * 1024)), max_steps=math.ceil(1.719e12 / (4608 * 1024)),
                             max_seq_len=1024, schedule="wsd", decay_steps=0)),
    ("modernbert-large", dict(global_batch_size=4928, micro_batch_size=56, accumulation_steps=11, lr=5e-4,
                              warmup_steps=math.ceil(2e9 / (4928 * 1024)), max_steps=math.ceil(1.719e12 / (4928 * 1024)),
                              max_seq_len=1024, schedule="wsd", decay_steps=0)),
    ("modernbert-base-context", dict(global_batch_size=576, micro_batch_size=12, accumulation_steps=6, lr=3e-4,
                                     warmup_steps=0, max_steps=math.ceil(250e9 / (576 * 8192)), max_seq_len=8192,
                                     decay_steps=0)),
    ("modernbert-base-decay", dict(global_batch_size=576, micro_batch_size=12, lr=3e-4, warmup_steps=0,
                                   max_steps=math.ceil(50e9 / (576 * 8192)), max_seq_len=8192,
                                   decay_steps=math.ceil(50e9 / (576 * 8192)), decay_shape="1-sqrt", end_lr=3e-7)),
    ("modernbert-large-context", dict(global_batch_size=616, micro_batch_size=7, accumulation_steps=11, lr=5e-5,
                                      warmup_steps=0, max_steps=math.ceil(250e9 / (616 * 8192)), max_seq_len=8192)),
])
def test_plan_at_8_workers_reproduces_the_published_configs(name, expected):
    recipe = load_recipe(RECIPES / f"{name}.toml")
    plan = make_plan(recipe, 8).to_dict()
    assert {k: plan[k] for k in expected} == expected
    assert recipe.data.mask_prob == 0.3 and recipe.optim.name == "stableadamw"
    assert (recipe.optim.beta1, recipe.optim.beta2, recipe.optim.eps) == (0.9, 0.98, 1e-6)
    model = recipe.model
    assert model["architecture"] == "modernbert" and model["local_attention"] == 128
    assert model["global_rope_theta"] == (160_000.0 if plan["max_seq_len"] == 8192 else 10_000.0)


def test_base_shape_is_modernbert_base():
    recipe = load_recipe(BASE)
    assert {k: recipe.model[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                         "intermediate_size", "vocab_size")} == dict(
        hidden_size=768, num_hidden_layers=22, num_attention_heads=12, intermediate_size=1152, vocab_size=50368)


def test_plan_cli_prints_any_worker_count_with_its_keys(cli):
    result = cli("hvdbert.plan", ["--recipe", BASE, "--workers", "16", "--json"])
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    for key in ("workers", "global_batch_size", "micro_batch_size", "accumulation_steps", "lr", "warmup_steps",
                "max_steps", "max_seq_len", "max_predictions_per_seq", "scaling"):
        assert key in plan
    assert (plan["workers"], plan["global_batch_size"], plan["accumulation_steps"]) == (16, 4608, 3)


# ------------------------------------------------------------------------------------------------
# The [model] section per family


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_dropout_prob=0.1"], "unknown key model.hidden_dropout_prob"),  # a BertConfig key
    (["model.local_atention=64"], "did you mean model.local_attention?"),
    (["model.local_attention=\"wide\""], "model.local_attention = 'wide' has the wrong type; expected an integer"),
    (["model.architecture=\"gpt2\""], "model.architecture = 'gpt2' is not valid; choose one of bert, modernbert"),
    (["data.format=\"nsp\""], "data.format = nsp needs a next-sentence head"),
])
def test_model_section_is_checked_against_the_family(overrides, message):
    with pytest.raises(UsageError) as error:
        load_recipe(BASE, overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_model_key_on_the_command_line_is_one_line_exit_2(cli):
    result = cli("hvdbert.plan", ["--recipe", BASE, "--workers", "8", "--set", "model.sliding_window=64"])
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key model.sliding_window" in lines[0] and "model.local_attention" in lines[0]


def test_bert_recipes_still_take_bert_config_fields():
    recipe = load_recipe(RECIPES / "tiny.toml", ["model.architecture=\"bert\""])
    assert recipe.model["hidden_dropout_prob"] == 0.1


# ------------------------------------------------------------------------------------------------
# Gather-first loss and the schedule


def test_gather_first_loss_equals_transformers_masked_lm_loss():
    recipe = load_recipe(RECIPES / "tiny-modernbert.toml")
    torch.manual_seed(0)
    model = build_model({**recipe.model, "pad_token_id": 0, "cls_token_id": 2, "sep_token_id": 3,
                         "bos_token_id": 2, "eos_token_id": 3}, with_nsp=False).eval()
    input_ids = torch.randint(5, 4096, (2, 64))
    positions = torch.tensor([[1, 7, 40, 63], [0, 2, 33, 50]])
    labels = torch.randint(5, 4096, positions.shape)
    labels[1, 3] = -100  # a padded prediction slot
    with torch.no_grad():
        ours = pretraining_loss(model, {"input_ids": input_ids, "masked_positions": positions, "masked_labels": labels})
        dense_labels = torch.full_like(input_ids, -100).scatter(1, positions, labels)
        theirs = model(input_ids=input_ids, labels=dense_labels).loss
    assert model.config._attn_implementation == "sdpa"  # on CPU, and wherever flash-attn is missing
    assert int(ours.mlm_count) == 7
    assert abs(float(ours.mlm_loss) - float(theirs)) < 1e-5


def test_checkpoint_compatibility_knows_the_family_and_the_context_phase(tmp_path):
    main = load_recipe(BASE).model
    context = load_recipe(RECIPES / "modernbert-base-context.toml").model
    saved = checkpoint.Checkpoint(tmp_path, {"tokenizer_sha256": "t"}, {"model": main})
    checkpoint.check_compatible(saved, main, "t")
    # The context phase starts from the main phase: longer positions and a larger global RoPE theta.
    checkpoint.check_compatible(saved, context, "t", allow_longer_positions=True)
    with pytest.raises(UsageError, match="model.global_rope_theta = 10000.0 there, 160000.0 here"):
        checkpoint.check_compatible(saved, context, "t")  # --resume: the same model only
    with pytest.raises(UsageError, match="it can only grow"):
        longer = checkpoint.Checkpoint(tmp_path, {}, {"model": context})
        checkpoint.check_compatible(longer, main, "t", allow_longer_positions=True)
    bert = load_recipe(RECIPES / "tiny.toml").model  # saved before model.architecture existed
    old_bert = checkpoint.Checkpoint(tmp_path, {}, {"model": bert})
    checkpoint.check_compatible(old_bert, {**bert, "architecture": "bert"}, "t")
    with pytest.raises(UsageError, match="model.architecture = 'bert' there, 'modernbert' here"):
        checkpoint.check_compatible(old_bert, main, "t")


def test_wsd_schedule_warms_up_holds_then_decays_as_one_minus_sqrt():
    recipe = load_recipe(RECIPES / "tiny-modernbert.toml", ["optim.schedule=\"wsd\"", "optim.warmup_proportion=0.1",
                                                            "optim.decay_proportion=0.2", "optim.decay_shape=\"1-sqrt\"",
                                                            "optim.end_lr=1e-4", "train.max_steps=100"])
    plan = make_plan(recipe, 2)
    assert (plan.warmup_steps, plan.decay_steps) == (10, 20)
    peak = recipe.optim.lr
    assert lr_at(0, plan) == pytest.approx(peak / 10) and lr_at(9, plan) == pytest.approx(peak)
    assert lr_at(10, plan) == lr_at(79, plan) == peak
    assert lr_at(84, plan) == pytest.approx(1e-4 + (peak - 1e-4) * (1 - math.sqrt(5 / 20)))
    assert lr_at(99, plan) == pytest.approx(1e-4)


def test_wsd_warmup_and_decay_together_beyond_the_run_is_refused():
    with pytest.raises(UsageError, match="optim.warmup_proportion \\+ optim.decay_proportion"):
        load_recipe(BASE, ["optim.warmup_proportion=0.5", "optim.decay_proportion=0.6"])


def test_flops_count_geglu_sliding_windows_and_the_gathered_head():
    from hvdbert.bench.flops import training_flops_per_sequence

    fields = load_recipe(RECIPES / "tiny-modernbert.toml").model  # H 128, I 256, 3 layers, window 32, V 4096
    H, I, V, S = 128, 256, 4096, 64
    weights = 6 * (4 * H * H + 3 * H * I) * S  # per layer: Wqkv + Wo, GeGLU's Wi (2I) + Wo
    keys = {"full_attention": S, "sliding_attention": 2 * (32 // 2) + 1}  # layer 0 global, 1-2 sliding
    attention = 12 * H * S * (keys["full_attention"] + 2 * keys["sliding_attention"])
    head = 6 * (H * H + H * V) * 20
    assert training_flops_per_sequence(fields, S, 20) == 3 * weights + attention + head


# ------------------------------------------------------------------------------------------------
# Real runs


def pretrain(run_dir: Path, env, np: int, launcher: str, extra=()) -> str:
    """Trains; returns what the run printed on stderr (a plain run, np=1, runs in this process)."""
    args = ["--recipe", str(BASE), "--output", str(run_dir), *SHORT, *extra]
    if launcher == "plain":
        outcome = run_main_captured("hvdbert.pretrain", args)
        assert outcome.returncode == 0, outcome.stderr[-3000:]
        return outcome.stderr
    return run_module("hvdbert.pretrain", args, env, np=np, launcher=launcher).stderr


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hvdbert_env) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("modernbert")
    pretrain(tmp / "np2", hvdbert_env, 2, "gloo")
    pretrain(tmp / "np1", hvdbert_env, 1, "plain")
    return {"np2": tmp / "np2", "np1": tmp / "np1"}


@pytest.mark.multiprocess
def test_two_workers_equal_one_worker_with_accumulation_and_learn(runs):
    one, two = read_metrics(runs["np1"]), read_metrics(runs["np2"])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 9))
    assert [(r["workers"], r["accumulation_steps"]) for r in (one[0], two[0])] == [(1, 2), (2, 1)]
    differences = [abs(a["loss"] - b["loss"]) for a, b in zip(one, two)]
    print("np1 vs np2 loss differences:", differences)
    assert max(differences) <= 1e-5, differences
    assert two[-1]["loss"] < two[0]["loss"] - 0.5  # the base recipe with a tiny shape learns
    assert two[0]["real_token_fraction"] == 1.0  # packed MLM sequences: no padding


def copy_stopped_at(reference: Path, destination: Path, step: int) -> Path:
    shutil.copytree(reference, destination)
    for path in (destination / "checkpoints").iterdir():
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    return destination


@pytest.mark.multiprocess
@pytest.mark.parametrize("np, launcher, tolerance", [(2, "gloo", 0.0), (1, "plain", 1e-5)])
def test_resume_reproduces_the_uninterrupted_run(runs, hvdbert_env, tmp_path, np, launcher, tolerance):
    """Stopped after step 4 of the 2-worker run; resumed on 2 workers (bit-identical) or on 1."""
    run_dir = copy_stopped_at(runs["np2"], tmp_path / "resumed", 4)
    stderr = pretrain(run_dir, hvdbert_env, np, launcher, ["--resume", "auto"])
    assert "resumed from" in stderr and "step 4" in stderr
    expected, got = losses(runs["np2"]), losses(run_dir)
    assert list(got) == list(range(1, 9))
    differences = [abs(expected[s] - got[s]) for s in range(5, 9)]
    print(f"np2 -> np{np} loss differences, steps 5-8:", differences)
    assert max(differences) <= tolerance, differences


@pytest.mark.multiprocess
def test_export_loads_in_fill_mask_offline_with_the_checkpoints_logits(runs, hvdbert_env, cli, tmp_path):
    env = {**hvdbert_env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    hf_dir = tmp_path / "hf"
    result = cli("hvdbert.export", ["--run", runs["np2"], "--output", hf_dir])
    assert "step 8" in result.stdout and "ModernBertForMaskedLM" in result.stdout
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, pipeline\n"
        "model = AutoModelForMaskedLM.from_pretrained(sys.argv[1]).eval()\n"
        "pooling = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=2).config.classifier_pooling\n"
        "out = pipeline('fill-mask', model=sys.argv[1])('the history of the [MASK] is long .')\n"
        "ids = torch.arange(5, 5 + 2 * 64).view(2, 64)\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=ids).logits\n"
        "print(json.dumps({'class': type(model).__name__, 'n': len(out), 'logits': logits[:, ::7, ::97].tolist(),\n"
        "                  'pooling': pooling}))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script, str(hf_dir)], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["class"] == "ModernBertForMaskedLM" and report["n"] == 5
    # a classifier fine-tuned from the export pools the mean: masked LM never trained [CLS]'s output
    assert report["pooling"] == "mean"
    assert json.loads((hf_dir / "config.json").read_text())["pretraining_max_seq_len"] == 64

    found = checkpoint.latest_checkpoint(runs["np2"])
    model = build_model(found.recipe["model"], with_nsp=False)
    checkpoint.load_weights(model, found.weights(), found.path)
    with torch.no_grad():
        ours = model.eval()(input_ids=torch.arange(5, 5 + 2 * 64).view(2, 64)).logits[:, ::7, ::97]
    assert torch.equal(ours, torch.tensor(report["logits"]))


@pytest.mark.multiprocess
def test_the_probe_fine_tunes_a_mean_pooled_modernbert(runs, cli, tmp_path):
    from transformers import AutoModelForSequenceClassification

    task = tmp_path / "task.csv"  # two classes, three documents each
    task.write_text("text,label\n" + "".join(f"{text},{label}\n" for label, texts in (
        ("loop", ("Stop the event loop.", "Run until the future is done.", "Schedule a callback soon.")),
        ("mail", ("Parse a message from a string.", "Return the header value.", "Set the payload of a message.")))
        for text in texts))
    out = tmp_path / "probe"
    result = cli("hvdbert.finetune", ["--model", runs["np1"], "--task", task, "--output", out, "--epochs", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["pooling"], results["max_length"]) == ("mean", 64)  # the base recipe's sequence, not 128
    model = AutoModelForSequenceClassification.from_pretrained(str(out))  # transformers' own class
    assert type(model).__name__ == "ModernBertForSequenceClassification" and model.config.classifier_pooling == "mean"
