"""Held-out evaluation: masked-LM loss, accuracy and perplexity (and NSP accuracy) of a model.

    python -m hvdbert.evaluate --run RUN_DIR [--checkpoint DIR] [--data DIR] [--json FILE] [--set eval.KEY=V]
    python -m hvdbert.evaluate --model HF_DIR --data DIR [--json FILE] [--set eval.KEY=V]
    horovodrun -np N python -m hvdbert.evaluate ...     (the same figures, the work split N ways)

The held-out sequences (DATA_DIR/validation from `prepare --validation-fraction`, or a directory
prepared with the same tokenizer) are masked once, as a pure function of (eval.seed, sequence):
every evaluation, in a run or of any checkpoint, sees the same masks, so a curve compares like with
like. Sequences are cut into micro-batches of batch.micro_batch_size in a fixed order and micro-batch
b goes to rank b mod N: each micro-batch holds the same sequences for any worker count, and the
per-rank sums meet in one allreduce, so the figure does not depend on N. The model runs with dropout
off and no random number is drawn: training goes on exactly as it would have without evaluation.
--model takes a transformers masked-LM directory (hvdbert.export's output, a Trainer checkpoint) and
evaluates it identically, with the [eval] defaults unless --set says otherwise.

Beside the model's figures stands a baseline: eval_unigram_cross_entropy, the held-out loss of a
predictor that ignores the context and predicts the training data's token frequencies (prepare
stores them: DATA_DIR/token_counts.npy). A loss below it has learned something from the context.
With --model the training data is the one whose validation split --data is.
"""
from __future__ import annotations

if __name__ == "__main__":  # the program: a Ctrl-C while torch imports is one line, not a traceback
    from hvdbert.errors import quiet_interrupts

    quiet_interrupts("hvdbert.evaluate")

import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hvdbert.config import EvalConfig, Recipe, apply_overrides, recipe_from_tree
from hvdbert.data.loader import permute
from hvdbert.data.masking import IGNORE_INDEX, MaskingRule, mask_tokens
from hvdbert.data.shards import MANIFEST, Manifest, PreparedData, read_token_counts
from hvdbert.errors import ArgumentParser, UsageError, cli_entry
from hvdbert.files import check_output_file
from hvdbert.hooks import StepHook
from hvdbert.model import STAT_NAMES, micro_batch_stats, named_stats, pretraining_loss
from hvdbert.preflight import open_eval_data

log = logging.getLogger("hvdbert")


def unigram_cross_entropy(train_counts: np.ndarray, labels: np.ndarray, unpredicted_ids) -> float:
    """Mean negative log-probability (nats) of `labels` under the training data's unigram frequencies:
    the held-out loss of a predictor that ignores the context and says what the training text says
    most often. The frequencies are add-one (Laplace) smoothed over the V ids masking can choose, so a
    token the N training tokens never hold costs log(N + V) rather than infinity; add-one rather than
    a tuned add-k because a k chosen for the lowest figure would be fitted on the held-out labels, and
    the choice moves the figure little: on the embedded corpus (tiny recipe, N = 449,280, V = 4,093)
    add-k for k from 0.01 to 2 gives 6.2648 to 6.2591, add-one 6.2596. `unpredicted_ids` (padding,
    [CLS], [SEP]) are never masked, so the predictor gives them nothing."""
    smoothed = train_counts.astype(np.float64) + 1.0
    smoothed[list(unpredicted_ids)] = 0.0
    return float(-np.log(smoothed[labels] / smoothed.sum()).mean())


class HeldOut:
    """The held-out sequences of every evaluation and their masks, fixed once. `train_counts` (the
    training data's token counts, PreparedData.token_counts) gives the unigram baseline; None: none."""

    def __init__(self, data: PreparedData, cfg: EvalConfig, micro_batch_size: int,
                 train_counts: np.ndarray | None = None):
        self.data = data
        n = len(data)
        take = n if cfg.max_sequences == 0 else min(n, cfg.max_sequences)
        # A fixed subset spread over the whole held-out set (not its first documents), in index order.
        self.samples = np.sort(permute(np.arange(n), n, cfg.seed, 0)[:take])
        self.micro_batches = [self.samples[i:i + micro_batch_size] for i in range(0, take, micro_batch_size)]
        special = data.manifest.special_token_ids
        seq_len = data.manifest.seq_len
        self.seed = cfg.seed
        # No cap below mask_prob: every chosen position is predicted (max_predictions covers them all).
        self.rule = MaskingRule(mask_prob=cfg.mask_prob, max_predictions=max(1, math.ceil(seq_len * cfg.mask_prob)),
                                mask_id=special["mask"], vocab_size=data.manifest.vocab_size,
                                special_ids=(special["pad"], special["cls"], special["sep"]))
        self.unigram_cross_entropy = (None if train_counts is None else
                                      unigram_cross_entropy(train_counts, self.masked_labels(), self.rule.special_ids))

    def batch(self, samples: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.data.get(samples)
        rows.pop("word_start", None)
        if self.data.has_nsp:
            rows["attention_mask"] = (rows["input_ids"] != self.data.manifest.special_token_ids["pad"]).astype(np.int64)
        masked = mask_tokens(rows["input_ids"], samples, 0, self.seed, self.rule)
        return {name: torch.from_numpy(value) for name, value in {**rows, **masked}.items()}

    def masked_labels(self) -> np.ndarray:
        """The token ids every evaluation predicts, in order."""
        labels = np.concatenate([self.batch(b)["masked_labels"].numpy().ravel() for b in self.micro_batches])
        return labels[labels != IGNORE_INDEX]

    def owned(self, rank: int, size: int) -> list[np.ndarray]:
        return self.micro_batches[rank::size]


def evaluate(model: torch.nn.Module, held_out: HeldOut, dist, device: torch.device, autocast) -> dict:
    """The held-out figures of `model` (a BertForPreTraining); every rank calls it and gets them all.
    `autocast` is a context factory (state.Precision.autocast). The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()  # dropout off
    sums = torch.zeros(len(STAT_NAMES), dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for samples in held_out.owned(dist.rank, dist.size):
                batch = {k: v.to(device) for k, v in held_out.batch(samples).items()}
                with autocast():
                    out = pretraining_loss(model, batch)
                sums += micro_batch_stats(out, batch, sums.new_zeros(()))
    finally:
        model.train(was_training)
    total = named_stats(dist.allreduce_sum(sums, name="eval"))
    loss = total["mlm_loss_sum"] / max(total["mlm_count"], 1.0)
    record = {
        "eval_loss": loss,
        "eval_mlm_accuracy": total["mlm_correct"] / max(total["mlm_count"], 1.0),
        "eval_perplexity": math.exp(loss) if loss < 700 else math.inf,
        "eval_sequences": int(total["sequences"]),
        "eval_masked_tokens": int(total["mlm_count"]),
    }
    if held_out.unigram_cross_entropy is not None:
        record["eval_unigram_cross_entropy"] = held_out.unigram_cross_entropy
    if held_out.data.has_nsp and "next_sentence_label" in held_out.batch(held_out.micro_batches[0][:1]):
        record["eval_nsp_loss"] = total["nsp_loss_sum"] / max(total["sequences"], 1.0)
        record["eval_nsp_accuracy"] = total["nsp_correct"] / max(total["sequences"], 1.0)
    return record


@dataclass
class Evaluator(StepHook):
    """When a run evaluates (eval.every_steps, eval.at_end) and on what. As a step hook: a step that
    evaluates is always logged, and the held-out figures join that step's metrics record."""

    cfg: EvalConfig
    held_out: HeldOut
    now: bool = False  # this step evaluates
    last: dict = field(default_factory=dict)  # the last held-out figures of this train() call

    def due(self, step: int, max_steps: int) -> bool:
        return ((self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0)
                or (self.cfg.at_end and step == max_steps))

    def evaluate(self, run) -> dict:
        return evaluate(run.model, self.held_out, run.dist, run.device, run.precision.autocast)

    def log_due(self, run) -> bool:
        self.now = self.due(run.state.step, run.plan.max_steps)
        return self.now

    def on_log(self, run, record: dict) -> None:
        if self.now:
            self.last = self.evaluate(run)
            record.update(self.last)

    def summary(self) -> dict:
        # The figures of this train() call only: an elastic job's next call starts without any.
        figures, self.last = self.last, {}
        return {"eval": figures}


def training_counts(directory: Path, manifest: Manifest) -> tuple[np.ndarray | None, str]:
    """The token counts of the training data in `directory` for the unigram baseline, or None and the
    one line that says why there is no baseline."""
    counts = read_token_counts(directory, manifest)
    if counts is not None:
        return counts, ""
    return None, (f"{directory} was prepared before hvdbert stored the training data's token counts: no unigram "
                  "baseline (eval_unigram_cross_entropy); prepare the data again to get one")


def counts_of_split(data: PreparedData) -> tuple[np.ndarray | None, str]:
    """training_counts of the prepared data whose validation split `data` is, for --model --data DIR
    (no run names the training data there); None and why when DIR is not such a split."""
    parent = data.directory.parent
    if (parent / MANIFEST).is_file():
        manifest = Manifest.read(parent)
        if (manifest.validation_dir and (parent / manifest.validation_dir).resolve() == data.directory.resolve()
                and manifest.tokenizer_sha256 == data.manifest.tokenizer_sha256):
            return training_counts(parent, manifest)
    return None, (f"--data {data.directory} is not the validation split of prepared data (DATA_DIR/validation), so "
                  "no training data is known: no unigram baseline (eval_unigram_cross_entropy)")


def build_evaluator(eval_dir: Path | None, run) -> Evaluator | None:
    """The run's evaluator, or None when the recipe asks for no evaluation."""
    recipe = run.recipe
    if not recipe.eval.requested:
        return None
    data = open_eval_data(eval_dir, run.data, recipe, "--eval-data", trained_nsp=run.data.has_nsp)
    counts, why_none = training_counts(run.data.directory, run.data.manifest)
    if why_none and run.dist.rank == 0:
        log.warning("hvdbert: %s", why_none)
    return Evaluator(recipe.eval, HeldOut(data, recipe.eval, recipe.batch.micro_batch_size, counts))


def summary_text(record: dict) -> str:
    """The held-out part of a final summary line."""
    baseline = ("" if "eval_unigram_cross_entropy" not in record else
                f", a training-unigram predictor's {record['eval_unigram_cross_entropy']:.4f}")
    text = (f"held-out loss {record['eval_loss']:.4f}, perplexity {record['eval_perplexity']:.2f}, "
            f"MLM accuracy {record['eval_mlm_accuracy']:.4f} ({record['eval_sequences']} sequences{baseline})")
    if "eval_nsp_accuracy" in record:
        text += f", NSP accuracy {record['eval_nsp_accuracy']:.4f}"
    return text


# ------------------------------------------------------------------------------------------------
# The command


def recipe_of_checkpoint(found, overrides: list[str] = ()) -> Recipe:
    """The recipe a checkpoint was trained with (its recipe.json) under `overrides` (--set), validated
    as any recipe."""
    from dataclasses import fields

    sections = {f.name for f in fields(Recipe)} - {"source"}
    tree = {k: v for k, v in found.recipe.items() if k in sections and isinstance(v, dict)}
    return recipe_from_tree(apply_overrides(tree, list(overrides)), str(found.path / "recipe.json"))


def load_transformers_mlm(model_dir: Path, data: PreparedData) -> torch.nn.Module:
    """A transformers model directory as `evaluate()` takes it: BertForPreTraining when it was saved as
    one (its NSP head is evaluated on sentence-pair data), else AutoModelForMaskedLM (BertForMaskedLM,
    ModernBertForMaskedLM). Refused in one line: a directory that is not a model, a tokenizer beside it
    with another vocabulary than the held-out data's, too few token ids or positions, or sentence-pair
    data for a model without an NSP head."""
    from transformers import AutoConfig, AutoModelForMaskedLM, BertForPreTraining

    from hvdbert.data.tokenizer import load_tokenizer

    if not (model_dir / "config.json").is_file():
        raise UsageError(f"--model {model_dir}: not a transformers model directory (no config.json); for an "
                         "hvdbert run use --run RUN_DIR")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    manifest = data.manifest
    if any((model_dir / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        if load_tokenizer(model_dir).get_vocab() != load_tokenizer(data.tokenizer_dir).get_vocab():
            raise UsageError(f"--model {model_dir}: its tokenizer has another vocabulary than the held-out data "
                             f"{data.directory}; evaluate on data prepared with --tokenizer {model_dir}")
    if config.vocab_size < manifest.vocab_size:
        raise UsageError(f"--model {model_dir}: {config.vocab_size} token ids, but {data.directory} uses "
                         f"{manifest.vocab_size}; it was not trained with this data's tokenizer")
    if manifest.seq_len > config.max_position_embeddings:
        raise UsageError(f"--data {data.directory}: sequences of {manifest.seq_len} tokens exceed the model's "
                         f"max_position_embeddings = {config.max_position_embeddings}")
    if "BertForPreTraining" in (config.architectures or []):
        return BertForPreTraining.from_pretrained(str(model_dir), local_files_only=True)
    if data.has_nsp:
        raise UsageError(f"--model {model_dir} has no next-sentence head ({', '.join(config.architectures or [])}) "
                         f"but {data.directory} holds sentence pairs; evaluate it on mlm data")
    return AutoModelForMaskedLM.from_pretrained(str(model_dir), local_files_only=True)


@cli_entry("hvdbert.evaluate")
def main(argv: list[str] | None = None) -> int:
    from hvdbert import checkpoint
    from hvdbert.agreement import check_agreement
    from hvdbert.dist import init_distributed
    from hvdbert.model import build_model
    from hvdbert.run import choose_device
    from hvdbert.state import Precision

    parser = ArgumentParser(prog="python -m hvdbert.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="run directory (hvdbert.pretrain --output)")
    parser.add_argument("--model", type=Path, help="a transformers model directory instead of --run "
                                                   "(hvdbert.export's output, a Trainer checkpoint); needs --data")
    parser.add_argument("--checkpoint", type=Path, help="evaluate this checkpoint (default: the run's newest)")
    parser.add_argument("--data", type=Path, help="held-out data directory (default: the run's evaluation "
                                                  "data, else its DATA_DIR/validation)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="e.g. eval.max_sequences=0: over the checkpoint's recipe, or the defaults with --model")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.model is None):
        raise UsageError("give one of --run RUN_DIR (an hvdbert run) and --model HF_DIR (a transformers model)")
    if args.json:
        check_output_file(args.json)
    if args.model is not None:
        if args.checkpoint is not None or args.data is None:
            raise UsageError("--model HF_DIR takes --data DIR (prepared held-out data, e.g. DATA_DIR/validation) "
                             "and no --checkpoint")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars: the one line below is the output
        recipe = recipe_from_tree(apply_overrides({}, args.set), "--set")
        data = PreparedData(args.data)
        model = load_transformers_mlm(args.model, data)
        source, step = str(args.model), None
        counts, why_none = counts_of_split(data)
    else:
        # the weights are read with the choice: a run still training may prune what it chose next
        found, weights = checkpoint.checkpoint_and_weights(args.run, args.checkpoint)
        recipe = recipe_of_checkpoint(found, args.set)
        train_dir = Path(found.recipe.get("data_dir", ""))
        eval_dir = args.data or (Path(found.recipe["eval_data_dir"]) if found.recipe.get("eval_data_dir") else None)
        if not (train_dir / "manifest.json").is_file():
            raise UsageError(f"{found.path}: its training data {train_dir} is gone; the held-out data must be "
                             "checked against its tokenizer")
        train_data = PreparedData(train_dir)
        data = open_eval_data(eval_dir, train_data, recipe, "--data",
                              trained_nsp=bool(found.recipe.get("with_nsp", False)))
        counts, why_none = training_counts(train_data.directory, train_data.manifest)
        model = build_model(recipe.model, with_nsp=bool(found.recipe.get("with_nsp", False)))
        checkpoint.load_weights(model, weights, found.path / checkpoint.WEIGHTS)
        source, step = str(found.path), found.step

    dist = init_distributed(recipe.dist)
    # As in pretrain: every rank evaluates its share of what rank 0 names, or all stop. A rank given
    # other data (mpirun's multiple-program form) would otherwise add its own sequences to the figure.
    check_agreement(dist, data, recipe.to_dict(), None, data.directory, evaluated=Path(source),
                    prog="hvdbert.evaluate")
    device = choose_device(dist, recipe.train.precision)
    if device.type == "cpu":
        torch.set_num_threads(recipe.dist.threads_per_worker)  # as in training: the same arithmetic
    model.to(device)
    if why_none and dist.rank == 0:
        print(f"hvdbert.evaluate: warning: {why_none}", file=sys.stderr, flush=True)
    record = evaluate(model, HeldOut(data, recipe.eval, recipe.batch.micro_batch_size, counts), dist, device,
                      Precision.create(recipe.train.precision, device).autocast)
    record = {"checkpoint" if args.model is None else "model": source, "step": step,
              "eval_data": str(data.directory), **record}
    if dist.rank == 0:
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            temporary = args.json.with_name(args.json.name + ".tmp")
            try:
                temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
                temporary.replace(args.json)
            finally:
                temporary.unlink(missing_ok=True)  # a failed write or rename leaves no partial file
        where = source if step is None else f"{source} (step {step})"
        print(f"hvdbert: {where} on {data.directory}: {summary_text(record)}", flush=True)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
