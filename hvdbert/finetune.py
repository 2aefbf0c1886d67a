"""Fine-tune a pretrained encoder for sequence classification: a downstream probe of model quality.

    python -m hvdbert.finetune --model RUN_DIR|HF_DIR --task builtin|FILE [--text-field text]
                               [--label-field label] --output DIR [--json FILE] [--from-scratch]
                               [--seed 42] [--split-seed 0] [--train-per-class N] [--epochs 5] [--lr 1e-3]
                               [--encoder-lr 1e-4] [--max-length 128] [--pooling mean|cls]

--model is an hvdbert run directory (its newest checkpoint, exported as `hvdbert.export` does) or a
transformers model directory. The encoder gets a classification head and is fine-tuned with
transformers' Trainer on the task's training part; dev accuracy and macro-F1 are reported.
--from-scratch trains the same shape from a random initialisation instead: the difference between
the two is what pretraining bought.

The probe suits an encoder that masked LM alone pretrained: the head classifies the mean of the last
layer over the non-padding tokens (--pooling mean; masked LM never trains [CLS]'s output, nor BERT's
pooler), the encoder learns at --encoder-lr, below the new head's --lr, and examples are cut at the
sequence length the encoder was pretrained at (positions past it are untrained). The defaults are
hvdbert.config.FinetuneConfig's.

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
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hvdbert.config import FinetuneConfig
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


def resolve_model(args, work: Path) -> tuple[Path, int]:
    """A transformers model directory for --model: itself, or an hvdbert run exported into `work`; and
    the tokens per example (length_cap), found before anything is exported."""
    from hvdbert import checkpoint, families
    from hvdbert.export import PRETRAINING_LENGTH, export

    model = args.model
    if (model / "config.json").is_file():
        try:
            config = json.loads((model / "config.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"--model {model}: config.json is not valid JSON ({error}); give a directory "
                             "hvdbert.export or save_pretrained wrote") from None
        config = config if isinstance(config, dict) else {}  # transformers refuses it, when it loads it
        positions = config.get("max_position_embeddings")
        return model, length_cap(args, positions or FinetuneConfig.max_length, config.get(PRETRAINING_LENGTH))
    found = None
    if (model / checkpoint.STATE).is_file():
        found = checkpoint.open_checkpoint(model)
    elif (model / checkpoint.CHECKPOINTS).is_dir():
        found = checkpoint.latest_checkpoint(model)
    if found is None:
        raise UsageError(f"--model {model}: neither a transformers model directory (config.json) nor an hvdbert "
                         "run with a complete checkpoint (checkpoints/step-<N>)")
    max_length = length_cap(args, families.build_config(found.recipe["model"]).max_position_embeddings,
                            found.recipe.get("data", {}).get("max_seq_len"))
    exported = work / "pretrained"
    # finetune has no --tokenizer: another tokenizer comes with a model directory that export wrote
    export(found, Path(found.recipe.get("data_dir", "")) / "tokenizer", exported,
           choose=f"export the run with `python -m hvdbert.export --run {model} --tokenizer DIR --output HF_DIR` "
                  "and pass --model HF_DIR")
    return exported, max_length


class _Encoded:
    """Tokenized examples as the Trainer's dataset."""

    def __init__(self, tokenizer, examples: list[Example], label_ids: dict[str, int], max_length: int):
        self.features = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
        self.labels = [label_ids[e.label] for e in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {**{k: v[i] for k, v in self.features.items()}, "labels": self.labels[i]}


def length_cap(args, positions: int, pretrained: int | None) -> int:
    """--max-length, at most the pretraining sequence length (where known) and the model's positions. An
    explicit --max-length above that is refused: the positions past it are untrained."""
    limits = [(positions, "positions the model has (max_position_embeddings)")]
    if pretrained:
        limits.append((pretrained, "tokens it was pretrained on"))
    cap, why = min(limits)
    if args.max_length is None:
        return min(FinetuneConfig.max_length, cap)
    if args.max_length > cap:
        raise UsageError(f"--max-length {args.max_length}: more than the {cap} {why} by --model {args.model}, so "
                         f"positions past {cap} are untrained; give at most {cap}, or leave it out")
    return args.max_length


def classifier_class(config, pooling: str, model: Path):
    """The sequence-classification class for `config` with `pooling`: transformers' own, with ModernBERT's
    config.classifier_pooling, or for BERT with mean pooling hvdbert's (families/bert_pooled.py)."""
    from transformers import AutoModelForSequenceClassification

    config.classifier_pooling = pooling  # recorded in the saved config.json either way
    if config.model_type == "bert" and pooling == "mean":
        from hvdbert.families.bert_pooled import BertMeanPooledForSequenceClassification

        return BertMeanPooledForSequenceClassification
    if config.model_type not in ("bert", "modernbert") and pooling != "cls":
        raise UsageError(f"--pooling {pooling}: not available for --model {model} (model_type {config.model_type!r}; "
                         "mean pooling is for bert and modernbert); pass --pooling cls")
    return AutoModelForSequenceClassification


def parameter_groups(model, decay_names, encoder_lr: float, head_lr: float, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: the encoder (the model's base model: what pretraining gave) at encoder_lr,
    everything else (the head) at head_lr; weight decay on `decay_names` only. Each group is named."""
    encoder = {f"{model.base_model_prefix}.{name}" for name, _ in model.base_model.named_parameters()}
    groups = []
    for part, lr in (("encoder", encoder_lr), ("head", head_lr)):
        for decay in (True, False):
            params = [p for n, p in model.named_parameters()
                      if p.requires_grad and (n in encoder) == (part == "encoder") and (n in decay_names) == decay]
            if params:
                groups.append({"name": part, "params": params, "lr": lr, "weight_decay": weight_decay if decay else 0.0})
    return groups


def probe_trainer(**kwargs):
    """transformers' Trainer with the encoder and the head at their own rates (its AdamW, schedule and
    everything else as usual). `encoder_lr` joins Trainer's own keyword arguments."""
    import torch
    from transformers import Trainer

    class ProbeTrainer(Trainer):
        def __init__(self, encoder_lr: float, **rest):
            super().__init__(**rest)
            self.encoder_lr = encoder_lr

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = self.model if model is None else model
                groups = parameter_groups(model, set(self.get_decay_parameter_names(model)), self.encoder_lr,
                                          self.args.learning_rate, self.args.weight_decay)
                self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate,
                                                   betas=(self.args.adam_beta1, self.args.adam_beta2),
                                                   eps=self.args.adam_epsilon)
            return self.optimizer

    return ProbeTrainer(**kwargs)


def finetune(model_dir: Path, train: list[Example], dev: list[Example], labels: list[str], args, work: Path,
             max_length: int) -> dict:
    import torch
    from transformers import AutoConfig, DataCollatorWithPadding, TrainingArguments, set_seed

    from hvdbert.data.tokenizer import load_any_tokenizer

    label_ids = {label: i for i, label in enumerate(labels)}
    tokenizer = load_any_tokenizer(model_dir, "a transformers model directory needs its tokenizer beside config.json "
                                              "(hvdbert.export writes it)")
    config = AutoConfig.from_pretrained(str(model_dir), num_labels=len(labels), id2label=dict(enumerate(labels)),
                                        label2id=label_ids)
    model_class = classifier_class(config, args.pooling, args.model)
    set_seed(args.seed)  # the head's (and, from scratch, every weight's) initialisation; shuffling
    if args.from_scratch:
        model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    else:
        try:
            model = model_class.from_pretrained(str(model_dir), config=config)
        except OSError as error:
            if error.errno is not None:  # the machine's (a full disk, a permission): reported as such
                raise
            first_line = (str(error).strip().splitlines() or ["no weights"])[0]  # transformers: a file is missing
            raise UsageError(f"--model {model_dir}: cannot load its weights ({first_line}); give a directory "
                             "hvdbert.export or save_pretrained wrote, or pass --from-scratch") from None
    defaults = FinetuneConfig()
    training = TrainingArguments(
        output_dir=str(work / "trainer"), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        weight_decay=defaults.weight_decay, warmup_steps=defaults.warmup_ratio, seed=args.seed, save_strategy="no",
        logging_strategy="no", report_to=[], disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
    )
    trainer = probe_trainer(model=model, args=training, encoder_lr=args.encoder_lr,
                            train_dataset=_Encoded(tokenizer, train, label_ids, max_length),
                            data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    predictions = trainer.predict(_Encoded(tokenizer, dev, label_ids, max_length))
    predicted = np.asarray(predictions.predictions).argmax(-1)
    truth = np.asarray([label_ids[e.label] for e in dev])
    majority = max(sum(e.label == label for e in dev) for label in labels) / len(dev)
    return {"dev_accuracy": float((predicted == truth).mean()), "dev_macro_f1": macro_f1(truth, predicted, len(labels)),
            "dev_majority_accuracy": majority, "max_length": max_length}, trainer.model, tokenizer


def parse_args(argv):
    from dataclasses import fields

    defaults = FinetuneConfig()
    parser = ArgumentParser(prog="python -m hvdbert.finetune", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="hvdbert run directory or transformers model directory")
    parser.add_argument("--task", required=True, help="`builtin` or a labelled CSV / JSON-lines file")
    parser.add_argument("--text-field", default="text", help="the column holding the text")
    parser.add_argument("--label-field", default="label", help="the column holding the label")
    parser.add_argument("--output", required=True, type=Path, help="new directory: the fine-tuned model and results.json")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--from-scratch", action="store_true", help="random initialisation of the same shape (baseline)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="initialisation and shuffling")
    parser.add_argument("--split-seed", type=int, default=defaults.split_seed, help="which documents form the dev part")
    parser.add_argument("--dev-fraction", type=float, default=defaults.dev_fraction, help="of documents")
    parser.add_argument("--train-per-class", type=int, default=defaults.train_per_class,
                        help="fine-tune on at most N examples of each class, drawn by --split-seed (0: all)")
    parser.add_argument("--epochs", type=float, default=defaults.epochs)
    parser.add_argument("--lr", type=float, default=defaults.lr, help="the classification head's peak learning rate")
    parser.add_argument("--encoder-lr", type=float, default=defaults.encoder_lr,
                        help="the encoder's peak learning rate (below --lr: it keeps what pretraining gave)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"tokens per example, longer are cut (default {defaults.max_length}, at most the "
                             "pretraining sequence length)")
    parser.add_argument("--pooling", default=defaults.pooling, help="what the head classifies: mean (of the "
                        "non-padding tokens' last layer) or cls (the first token, through BERT's pooler)")
    args = parser.parse_args(argv)
    for spec in fields(FinetuneConfig):  # the ranges and choices FinetuneConfig declares, for the flags it names
        value = getattr(args, spec.name, None)
        flag = "--" + spec.name.replace("_", "-")
        if value is None:
            continue
        if "choices" in spec.metadata and value not in spec.metadata["choices"]:
            raise UsageError(f"{flag} {value}: choose one of {', '.join(spec.metadata['choices'])}")
        if "valid" in spec.metadata and not spec.metadata["valid"](value):
            raise UsageError(f"{flag} {value}: {spec.metadata['rule']}")
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
        model_dir, max_length = resolve_model(args, work)
        scores, model, tokenizer = finetune(model_dir, train, dev, labels, args, work, max_length)
        result = {"task": where, "model": str(args.model), "from_scratch": args.from_scratch, "seed": args.seed,
                  "split_seed": args.split_seed, **scores, "classes": len(labels), "labels": labels,
                  "train_examples": len(train), "train_per_class": args.train_per_class,
                  "dev_examples": len(dev), "epochs": args.epochs, "lr": args.lr,
                  "encoder_lr": args.encoder_lr, "pooling": args.pooling}
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
