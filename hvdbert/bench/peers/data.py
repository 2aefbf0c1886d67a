"""The peers' data path: transformers' run_mlm.py on hvdbert's corpus and tokenizer.

run_mlm.py (examples/pytorch/language-modeling, without --line_by_line) tokenizes each document with
its special tokens, concatenates everything and cuts it into blocks of max_seq_length (`group_texts`);
DataCollatorForLanguageModeling masks 15% of the tokens (80/10/10) when a batch is made. Here the
documents are the embedded corpus hvdbert prepared its data from (or, for the time-to-quality
benchmark, the training documents of any prepared directory: `training_documents`), and the tokenizer
is the one stored beside that data, so both sides see the same text, tokens and sequence length.
"""
from __future__ import annotations

import argparse
import json
from itertools import chain, islice
from pathlib import Path
from typing import Iterable


def peer_arguments(description: str) -> tuple[argparse.Namespace, dict]:
    """The peers' command line (--spec, --data, --result, written by hvdbert.bench) and the spec;
    sets torch's thread count from the spec before any work starts."""
    import torch

    parser = argparse.ArgumentParser(description=description.split("\n")[0])
    parser.add_argument("--spec", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()
    spec = json.loads(args.spec.read_text(encoding="utf-8"))
    torch.set_num_threads(spec["threads"])
    return args, spec


def trainer_levers(precision: str, compile: bool) -> dict:
    """The TrainingArguments that give transformers' Trainer the step levers hvdbert's recipe has
    (train.precision's autocast, train.compile's torch.compile), so a comparison stays fair."""
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "torch_compile": compile}


def load_peer_tokenizer(data_dir: Path):
    from hvdbert.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(data_dir) / "tokenizer")
    tokenizer.model_max_length = 1 << 30  # documents are cut by group_texts, as in run_mlm.py
    return tokenizer


def run_mlm_dataset(data_dir: Path, seq_len: int, documents: Iterable[str] | None = None):
    """The grouped training set run_mlm.py would build from `documents` (default: the embedded
    corpus): blocks of seq_len tokens, no padding."""
    import datasets
    from transformers.utils import logging as hf_logging

    from hvdbert.data.corpus import builtin_documents

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    tokenizer = load_peer_tokenizer(data_dir)
    raw = datasets.Dataset.from_dict({"text": list(builtin_documents() if documents is None else documents)})

    def tokenize_function(examples):
        return tokenizer(examples["text"], return_special_tokens_mask=True)

    def group_texts(examples):  # run_mlm.py's, verbatim apart from names
        concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
        total_length = len(concatenated[list(examples.keys())[0]])
        total_length = (total_length // seq_len) * seq_len
        return {k: [t[i: i + seq_len] for i in range(0, total_length, seq_len)]
                for k, t in concatenated.items()}

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])
    return tokenizer, tokenized.map(group_texts, batched=True)


def model_from_spec(spec: dict, tokenizer):
    """transformers' BertForMaskedLM or ModernBertForMaskedLM (model.architecture) from the bench's
    model fields, as run_mlm.py's from_config; ModernBERT's token ids are the tokenizer's, as in
    hvdbert's own run."""
    from transformers import AutoModelForMaskedLM

    from hvdbert import families

    special = {"pad": tokenizer.pad_token_id, "cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id}
    return AutoModelForMaskedLM.from_config(families.build_config(families.with_token_ids(spec["model"], special)))


def training_documents(data_dir: Path, inputs: list[str] | None = None, text_field: str | None = None,
                       text_mode: str | None = None) -> list[str]:
    """The documents a prepared directory was trained on, read again from its input (`inputs`, else
    the manifest's `source`) without the held-out ones (data/split.py's rule, the manifest's fraction).
    The input is read as prepare read it; a prefix of it when prepare took the first documents only
    (--builtin-max-documents). Checked against the data: as many documents as the manifest counts, and
    packed as prepare packs them, the first training sequence (shard 0 holds the first documents)."""
    import numpy as np

    from hvdbert.data.inputs import iter_documents, resolve_inputs
    from hvdbert.data.packing import MlmPacker
    from hvdbert.data.shards import PreparedData
    from hvdbert.data.split import SplitDocuments
    from hvdbert.errors import UsageError
    from hvdbert.prepare import Encoder

    data = PreparedData(data_dir)
    manifest = data.manifest
    if manifest.format != "mlm":
        raise UsageError(f"{data_dir}: prepared as {manifest.format}; run_mlm.py's recipe trains on mlm data")
    where = " ".join(inputs) if inputs else manifest.source
    hint = "pass the --input (and --text-field, --text-documents) the data was prepared from"
    if not where:
        raise UsageError(f"{data_dir}: its manifest names no source; {hint}")
    options = {k: v for k, v in (("text_field", text_field), ("text_mode", text_mode)) if v is not None}
    stream = iter_documents(resolve_inputs(inputs or manifest.source.split()), **options)
    documents = list(islice(SplitDocuments(stream, manifest.validation_fraction, held_out=False),
                            manifest.num_documents))
    special = manifest.special_token_ids
    packer = MlmPacker(manifest.seq_len, special["cls"], special["sep"], np.dtype(manifest.token_dtype))
    encoder, first = Encoder(data.tokenizer_dir, manifest.word_segmented), None
    for start in range(0, len(documents), 64):  # until one sequence is complete
        sequences, _ = packer.add(encoder.encode(documents[start:start + 64])[0])
        if len(sequences):
            first = sequences[0]
            break
    if len(documents) != manifest.num_documents or first is None or \
            not np.array_equal(first, data.get(np.array([0]))["input_ids"][0]):
        raise UsageError(f"{where}: its training documents ({len(documents)}) are not the ones {data_dir} was "
                         f"prepared from ({manifest.num_documents} documents); {hint}")
    return documents
