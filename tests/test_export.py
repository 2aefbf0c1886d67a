"""Export to transformers: loads offline, fill-mask works, logits equal the checkpoint's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHORT, TINY
from hvdbert import checkpoint
from hvdbert.model import build_model

def offline(env: dict) -> dict:
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture
def mlm_run(finished_run) -> Path:
    return finished_run


def checkpoint_mlm_logits(found: checkpoint.Checkpoint, input_ids: torch.Tensor) -> torch.Tensor:
    model = build_model(found.recipe["model"], with_nsp=found.recipe["with_nsp"])
    checkpoint.load_weights(model, found.weights(), found.path)
    model.eval()
    with torch.no_grad():
        return model.cls.predictions(model.bert(input_ids=input_ids).last_hidden_state)


def test_export_loads_offline_and_reproduces_the_checkpoint(mlm_run, hvdbert_env, cli, tmp_path):
    hf_dir = tmp_path / "hf"
    result = cli("hvdbert.export", ["--run", mlm_run, "--output", hf_dir])
    assert "step 4" in result.stdout and "BertForMaskedLM" in result.stdout
    assert (hf_dir / "model.safetensors").is_file() and not list(hf_dir.glob("*.bin"))
    assert (hf_dir / "tokenizer.json").is_file() or (hf_dir / "vocab.txt").is_file()

    # A fresh process with the hub switched off: AutoModelForMaskedLM and the fill-mask pipeline.
    script = (
        "import json, sys\n"
        "from transformers import AutoModelForMaskedLM, pipeline\n"
        "model = AutoModelForMaskedLM.from_pretrained(sys.argv[1])\n"
        "fill = pipeline('fill-mask', model=sys.argv[1])\n"
        "out = fill('the history of the [MASK] is long .')\n"
        "print(json.dumps({'class': type(model).__name__, 'n': len(out), 'tokens': [o['token_str'] for o in out]}))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script, str(hf_dir)], cwd=REPO, env=offline(hvdbert_env),
                            capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert report["class"] == "BertForMaskedLM" and report["n"] == 5

    # The exported MLM logits equal the checkpoint's on the same input.
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    input_ids = tokenizer(["the history of the [MASK] is long .", "a city on the river [MASK] ."],
                          padding=True, return_tensors="pt")["input_ids"]
    exported = AutoModelForMaskedLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        exported_logits = exported(input_ids=input_ids).logits
    found = checkpoint.latest_checkpoint(mlm_run)
    difference = float((exported_logits - checkpoint_mlm_logits(found, input_ids)).abs().max())
    print(f"export: max |logit difference| = {difference}")
    assert difference <= 1e-5


def test_export_refuses_to_overwrite(mlm_run, cli, tmp_path):
    hf_dir = tmp_path / "taken"
    hf_dir.mkdir()
    (hf_dir / "keep.txt").write_text("mine")
    result = cli("hvdbert.export", ["--run", mlm_run, "--output", hf_dir])
    assert result.returncode == 2 and "not empty" in result.stderr.strip().splitlines()[-1]
    assert [p.name for p in hf_dir.iterdir()] == ["keep.txt"]
    missing = cli("hvdbert.export", ["--run", tmp_path / "nothing", "--output", tmp_path / "x"])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_export_with_nsp_loads_as_bert_for_pretraining(nsp_run, cli, tmp_path):
    run_dir = nsp_run
    assert "nsp_loss" in (run_dir / "metrics.jsonl").read_text()
    hf_dir = tmp_path / "hf-nsp"
    result = cli("hvdbert.export", ["--run", run_dir, "--output", hf_dir])
    assert result.returncode == 0 and "BertForPreTraining" in result.stdout

    from transformers import AutoModelForMaskedLM, BertForPreTraining

    pretraining = BertForPreTraining.from_pretrained(str(hf_dir)).eval()
    found = checkpoint.latest_checkpoint(run_dir)
    weights = found.weights()
    for name in ("cls.seq_relationship.weight", "bert.pooler.dense.weight"):
        assert torch.equal(pretraining.state_dict()[name], weights[name]), name
    input_ids = torch.randint(5, 1500, (2, 20))
    masked_lm = AutoModelForMaskedLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        difference = float((masked_lm(input_ids=input_ids).logits - checkpoint_mlm_logits(found, input_ids)).abs().max())
    assert difference <= 1e-5


def test_export_refuses_bad_outputs_and_another_vocabulary_in_one_line(mlm_run, cli, tmp_path):
    from transformers import AutoTokenizer

    from hvdbert.data.tokenizer import train_wordpiece

    def refused(args: list[str], expected: str) -> None:
        result = cli("hvdbert.export", ["--run", mlm_run, *args])
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and expected in lines[0], result.stderr[-2000:]

    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    refused(["--output", str(a_file)], "is a file, not a directory")
    assert a_file.read_text() == "keep me"
    refused(["--output", "/proc/hvdbert-model"], "cannot write in /proc")
    other = tmp_path / "other-tokenizer"  # a BERT tokenizer, but trained on other text: other ids
    train_wordpiece(["completely different words here"] * 50, vocab_size=200).save_pretrained(str(other))
    refused(["--output", str(tmp_path / "hf"), "--tokenizer", str(other)], "has another vocabulary than the one")
    assert not (tmp_path / "hf").exists()
    # the data's own tokenizer, saved again elsewhere, is the same vocabulary: accepted
    data_tokenizer = Path(json.loads((mlm_run / "recipe.json").read_text())["data_dir"]) / "tokenizer"
    copy = tmp_path / "copy"
    AutoTokenizer.from_pretrained(str(data_tokenizer)).save_pretrained(str(copy))
    assert cli("hvdbert.export", ["--run", mlm_run, "--output", tmp_path / "hf", "--tokenizer", copy]).returncode == 0


def test_pretrain_names_a_deleted_tokenizer_directory(mlm_run, cli, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(Path(json.loads((mlm_run / "recipe.json").read_text())["data_dir"]), data)
    shutil.rmtree(data / "tokenizer")
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--data", data, "--output", tmp_path / "run", *SHORT])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == [
        f"hvdbert.pretrain: error: {data / 'tokenizer'}/tokenizer.json is missing: the tokenizer the data was "
        "prepared with must stay beside it; prepare the data again"], lines
