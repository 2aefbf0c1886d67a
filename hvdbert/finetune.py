"""Fine-tune a pretrained encoder for sequence classification: a downstream probe of model quality.

    python -m hvdbert.finetune --model RUN_DIR|HF_DIR --task builtin|FILE [--text-field text]
                               [--label-field label] --output DIR [--json FILE] [--from-scratch]
                               [--seed 42] [--split-seed 0] [--train-per-class N] [--epochs 5] [--lr 1e-4]
                               [--max-length 128]

--model is an hvdbert run directory (its newest checkpoint, exported as `hvdbert.export` does) or a
transformers model directory. The encoder gets a classification head (transformers'
AutoModelForSequenceClassification) and is fine-tuned with transformers' Trainer on the task's
training part; dev accuracy and macro-F1 are reported. --from-scratch trains the same shape from a
random initialisation instead: the difference between the two is what pretraining bought.

A task FILE is CSV (with a header) or JSON lines, one labelled example per row; each row is a
document. `builtin` is the embedded task: docstrings of the standard library labelled by the package
they document (docs/quality.md). The dev part is drawn by --split-seed, by document and class by class
(builtin: by source file, so one module's docstrings never sit on both sides), the same whatever --seed.
"""
from __future__ import annotations

if __name__ == "__main__":  # the program: a Ctrl-C while torch imports is one line, not a traceback
    from hvdbert.errors import quiet_interrupts

    quiet_interrupts("hvdbert.finetune")

import csv
import io
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvdbert.data.corpus import docstrings
from hvdbert.errors import ArgumentParser, UsageError, cli_entry
from hvdbert.files import check_output_file

# The embedded task's classes: standard-library packages present on every CPython 3 install (no
# optional ones such as tkinter, none removed in recent releases such as distutils or lib2to3),
# each with about 90-230 docstrings of BUILTIN_MIN_CHARS or more.
BUILTIN_PACKAGES = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "xml")
BUILTIN_MIN_CHARS = 60  # shorter docstrings are mostly one-line summaries that say little


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    document: str  # the unit the train/dev split keeps whole


def builtin_examples() -> list[Example]:
    """Docstrings of modules, classes and functions in BUILTIN_PACKAGES, labelled by package (read
    with `ast`, nothing imported). A docstring repeated verbatim is kept once."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    examples, seen = [], set()
    for package in BUILTIN_PACKAGES:
        for path in sorted((stdlib / package).rglob("*.py")):
            if {"test", "tests", "__pycache__"} & set(path.relative_to(stdlib).parts):
                continue
            for doc in docstrings(path, BUILTIN_MIN_CHARS):
                if doc not in seen:
                    seen.add(doc)
                    examples.append(Example(doc, package, str(path.relative_to(stdlib))))
    return examples


def file_examples(path: Path, text_field: str, label_field: str) -> list[Example]:
    """One example per CSV row or JSON line; every problem is one line naming the file and line."""
    if not path.is_file():
        raise UsageError(f"--task {path}: no such file; give a CSV or JSON-lines file, or `builtin`")
    examples = []
    raw = path.read_bytes()
    try:
        # utf-8-sig: Excel writes CSV with a byte-order mark, which would otherwise open the first field's name
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                         "save the task file as UTF-8") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise UsageError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = [(reader.line_num, row) for row in reader]
    for number, row in rows:
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{number}: expected an object with fields {text_field!r} and {label_field!r}")
        for name, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
            if row.get(name) is None or (isinstance(row[name], str) and not row[name].strip()):
                found = ", ".join(sorted(k for k in row if k is not None))
                raise UsageError(f"{path}:{number}: no field {name!r} (found: {found}); choose it with {flag}")
        examples.append(Example(str(row[text_field]), str(row[label_field]), f"{path}:{number}"))
    if not examples:
        raise UsageError(f"{path}: holds no example")
    return examples


def split_by_document(examples: list[Example], dev_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded draw of whole documents for dev, class by class (stratified): each class's documents, in
    a random order, go to dev while they fit in dev_fraction of its examples (at least one document)."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, dict[str, int]] = {}  # label -> document -> examples (a document counts under its first label)
    owner: dict[str, str] = {}
    for e in examples:
        label = owner.setdefault(e.document, e.label)
        by_class.setdefault(label, {}).setdefault(e.document, 0)
        by_class[label][e.document] += 1
    dev_documents = set()
    for label in sorted(by_class):
        documents = sorted(by_class[label])
        if len(documents) < 2:
            continue  # its one document trains
        wanted, taken = dev_fraction * sum(by_class[label].values()), 0
        for i in rng.permutation(len(documents)):  # each document that still fits the class's share
            if taken + by_class[label][documents[i]] <= wanted:
                dev_documents.add(documents[i])
                taken += by_class[label][documents[i]]
        if taken == 0:  # every document is larger than the share: the smallest one
            dev_documents.add(min(documents, key=lambda d: (by_class[label][d], d)))
    train = [e for e in examples if e.document not in dev_documents]
    dev = [e for e in examples if e.document in dev_documents]
    return train, dev


def few_per_class(train: list[Example], per_class: int, seed: int) -> list[Example]:
    """At most `per_class` training examples of each class, a seeded draw (in the task's order): the
    few-shot probe, where what the encoder learned before fine-tuning counts most."""
    rng = np.random.default_rng([seed, per_class])
    kept = []
    for label in sorted({e.label for e in train}):
        indices = [i for i, e in enumerate(train) if e.label == label]
        kept += [indices[i] for i in rng.permutation(len(indices))[:per_class]]
    return [train[i] for i in sorted(kept)]


def macro_f1(truth: np.ndarray, predicted: np.ndarray, classes: int) -> float:
    scores = []
    for c in range(classes):
        tp = int(((predicted == c) & (truth == c)).sum())
        fp = int(((predicted == c) & (truth != c)).sum())
        fn = int(((predicted != c) & (truth == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def resolve_model(model: Path, work: Path) -> Path:
    """A transformers model directory for --model: itself, or an hvdbert run exported into `work`."""
    from hvdbert import checkpoint
    from hvdbert.export import export

    if (model / "config.json").is_file():
        return model
    found = None
    if (model / checkpoint.STATE).is_file():
        found = checkpoint.open_checkpoint(model)
    elif (model / checkpoint.CHECKPOINTS).is_dir():
        found = checkpoint.latest_checkpoint(model)
    if found is None:
        raise UsageError(f"--model {model}: neither a transformers model directory (config.json) nor an hvdbert "
                         "run with a complete checkpoint (checkpoints/step-<N>)")
    exported = work / "pretrained"
    # finetune has no --tokenizer: another tokenizer comes with a model directory that export wrote
    export(found, Path(found.recipe.get("data_dir", "")) / "tokenizer", exported,
           choose=f"export the run with `python -m hvdbert.export --run {model} --tokenizer DIR --output HF_DIR` "
                  "and pass --model HF_DIR")
    return exported


class _Encoded:
    """Tokenized examples as the Trainer's dataset."""

    def __init__(self, tokenizer, examples: list[Example], label_ids: dict[str, int], max_length: int):
        self.features = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
        self.labels = [label_ids[e.label] for e in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.features.items()}, "labels": self.labels[i]}


def finetune(model_dir: Path, train: list[Example], dev: list[Example], labels: list[str], args, work: Path) -> dict:
    import torch
    from transformers import (AutoConfig, AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from hvdbert.data.tokenizer import load_any_tokenizer

    label_ids = {label: i for i, label in enumerate(labels)}
    tokenizer = load_any_tokenizer(model_dir, "a transformers model directory needs its tokenizer beside config.json "
                                              "(hvdbert.export writes it)")
    config = AutoConfig.from_pretrained(str(model_dir), num_labels=len(labels), id2label=dict(enumerate(labels)),
                                        label2id=label_ids)
    set_seed(args.seed)  # the head's (and, from scratch, every weight's) initialisation; shuffling
    if args.from_scratch:
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        try:
            model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), config=config)
        except OSError as error:
            if error.errno is not None:  # the machine's (a full disk, a permission): reported as such
                raise
            first_line = (str(error).strip().splitlines() or ["no weights"])[0]  # transformers: a file is missing
            raise UsageError(f"--model {model_dir}: cannot load its weights ({first_line}); give a directory "
                             "hvdbert.export or save_pretrained wrote, or pass --from-scratch") from None
    max_length = min(args.max_length, config.max_position_embeddings)
    training = TrainingArguments(
        output_dir=str(work / "trainer"), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, weight_decay=0.01,
        warmup_steps=0.1, seed=args.seed, save_strategy="no", logging_strategy="no", report_to=[],
        disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=training, train_dataset=_Encoded(tokenizer, train, label_ids, max_length),
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    predictions = trainer.predict(_Encoded(tokenizer, dev, label_ids, max_length))
    predicted = np.asarray(predictions.predictions).argmax(-1)
    truth = np.asarray([label_ids[e.label] for e in dev])
    majority = max(sum(e.label == label for e in dev) for label in labels) / len(dev)
    return {"dev_accuracy": float((predicted == truth).mean()), "dev_macro_f1": macro_f1(truth, predicted, len(labels)),
            "dev_majority_accuracy": majority}, trainer.model, tokenizer


def parse_args(argv):
    parser = ArgumentParser(prog="python -m hvdbert.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="hvdbert run directory or transformers model directory")
    parser.add_argument("--task", required=True, help="`builtin` or a labelled CSV / JSON-lines file")
    parser.add_argument("--text-field", default="text", help="the column holding the text")
    parser.add_argument("--label-field", default="label", help="the column holding the label")
    parser.add_argument("--output", required=True, type=Path, help="new directory: the fine-tuned model and results.json")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--from-scratch", action="store_true", help="random initialisation of the same shape (baseline)")
    parser.add_argument("--seed", type=int, default=42, help="initialisation and shuffling")
    parser.add_argument("--split-seed", type=int, default=0, help="which documents form the dev part")
    parser.add_argument("--dev-fraction", type=float, default=0.2, help="of documents")
    parser.add_argument("--train-per-class", type=int, default=0,
                        help="fine-tune on at most N examples of each class, drawn by --split-seed (0: all)")
    # Small BERTs fine-tune well at 1e-4, batch 32, a few epochs (Turc et al. 2019 sweep 3e-5..1e-4).
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (longer are cut)")
    args = parser.parse_args(argv)
    if not 0.0 < args.dev_fraction < 1.0:
        raise UsageError(f"--dev-fraction {args.dev_fraction}: must be in (0, 1), e.g. 0.2")
    if args.train_per_class < 0:
        raise UsageError(f"--train-per-class {args.train_per_class}: must be 0 (every example) or more, e.g. 16")
    for name in ("epochs", "lr", "batch_size", "max_length"):
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be greater than 0")
    return args


@cli_entry("hvdbert.finetune")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        raise UsageError(f"--output {args.output} already exists and is not empty; choose a new directory")
    if not args.model.is_dir():
        raise UsageError(f"--model {args.model}: no such directory; give an hvdbert run or a transformers model directory")
    if args.json:
        check_output_file(args.json)  # now, not after fine-tuning
    if args.task == "builtin":
        examples, where = builtin_examples(), "builtin"
    else:
        examples, where = file_examples(Path(args.task), args.text_field, args.label_field), args.task
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise UsageError(f"{where}: every example has the label {labels[0]!r}; classification needs at least 2 classes")
    train, dev = split_by_document(examples, args.dev_fraction, args.split_seed)
    if args.train_per_class:
        train = few_per_class(train, args.train_per_class, args.split_seed)
    if len({e.label for e in train}) < 2:
        raise UsageError(f"{where}: the training part holds one class only; give more examples of each class")
    if not dev:  # found now, not after training, when scoring would fail
        raise UsageError(f"{where}: the dev part is empty: each class has a single document ({len(examples)} "
                         f"examples, {len(labels)} classes); give at least 2 examples of some class")

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".finetune-", dir=args.output.parent) as scratch:
        work = Path(scratch)
        model_dir = resolve_model(args.model, work)
        scores, model, tokenizer = finetune(model_dir, train, dev, labels, args, work)
        result = {"task": where, "model": str(args.model), "from_scratch": args.from_scratch, "seed": args.seed,
                  "split_seed": args.split_seed, **scores, "classes": len(labels), "labels": labels,
                  "train_examples": len(train), "train_per_class": args.train_per_class,
                  "dev_examples": len(dev), "epochs": args.epochs, "lr": args.lr}
        final = work / "result"
        model.save_pretrained(str(final))
        tokenizer.save_pretrained(str(final))
        (final / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        if args.output.exists():
            args.output.rmdir()  # empty, checked above
        os.rename(final, args.output)  # the complete directory appears at once
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.output / "results.json", args.json)
    print(f"hvdbert: {'from scratch' if args.from_scratch else 'pretrained'} {args.model} on {where}: dev accuracy "
          f"{result['dev_accuracy']:.4f}, macro-F1 {result['dev_macro_f1']:.4f} ({len(labels)} classes, "
          f"{len(train)} train / {len(dev)} dev examples; majority class {result['dev_majority_accuracy']:.4f})",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
