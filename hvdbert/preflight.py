"""What a run's command line can be refused for before any worker starts, without writing anything.

The launchers run `preflight` (through `hvdbert.plan --workers N -- PRETRAIN ARGS`) before
horovodrun, on the very arguments the workers get, read by pretrain's own parser (`pretrain_parser`):
what a worker would refuse (a flag without its value, an unknown flag, data or held-out data that do
not fit) is refused before any worker starts. Rank 0 of `hvdbert.pretrain` runs it before Horovod
starts; the run re-checks all of it on rank 0 under the run directory's lock. It needs the recipe, the
data's manifests and the checkpoints' state files: it loads no model, optimizer or data preparation,
so the launchers' check stays quick.
"""
from __future__ import annotations

from pathlib import Path

from hvdbert import checkpoint
from hvdbert.config import Recipe
from hvdbert.data.shards import PreparedData
from hvdbert.data.tokenizer import tokenizer_hash
from hvdbert.errors import ArgumentParser, UsageError
from hvdbert.files import check_output_location
from hvdbert.runlock import check_free


def pretrain_parser() -> ArgumentParser:
    """hvdbert.pretrain's command line. It lives here so that the launchers' pre-flight reads the
    workers' arguments with the same parser as the workers: the two cannot disagree about a flag."""
    parser = ArgumentParser(prog="python -m hvdbert.pretrain", description="Pretrain BERT with Horovod.")
    parser.add_argument("--recipe", required=True, help="recipe TOML file (see recipes/)")
    parser.add_argument("--data", type=Path, help="prepared data directory (default: embedded corpus)")
    parser.add_argument("--output", required=True, type=Path, help="run directory")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--resume", metavar="auto|CHECKPOINT_DIR",
                        help="continue from the newest complete checkpoint in --output (auto; none yet: "
                             "start from scratch) or from the given checkpoint directory")
    parser.add_argument("--elastic", action="store_true",
                        help="Horovod elastic training (horovodrun --min-np/--max-np --host-discovery-script)")
    parser.add_argument("--eval-data", type=Path, metavar="DIR",
                        help="held-out data for [eval] (default: the --data directory's validation split)")
    return parser


def check_data(data: PreparedData, recipe: Recipe) -> None:
    """Refuse prepared data the recipe cannot train on (sequence length, format, vocabulary, tokenizer)."""
    data_dir, manifest = data.directory, data.manifest
    vocab_size = recipe.model_field("vocab_size")
    if manifest.seq_len != recipe.data.max_seq_len:
        raise UsageError(
            f"{data_dir}: prepared with sequence length {manifest.seq_len}, but the recipe has "
            f"data.max_seq_len = {recipe.data.max_seq_len}; prepare with --seq-len "
            f"{recipe.data.max_seq_len} or pass --set data.max_seq_len={manifest.seq_len}"
        )
    if manifest.format != recipe.data.format:
        raise UsageError(
            f"{data_dir}: prepared in format {manifest.format}, but the recipe has data.format = "
            f"{recipe.data.format}; prepare with --format {recipe.data.format} or pass "
            f"--set data.format={manifest.format}"
        )
    if manifest.vocab_size > vocab_size:
        raise UsageError(
            f"{data_dir}: the tokenizer has {manifest.vocab_size} tokens but model.vocab_size = "
            f"{vocab_size}; set model.vocab_size to at least {manifest.vocab_size}"
        )
    # The tokenizer stored with the data is the one the sequences were made with (and the one export
    # ships): it must be the one the manifest names.
    if not (data.tokenizer_dir / "tokenizer.json").is_file():
        raise UsageError(f"{data.tokenizer_dir}/tokenizer.json is missing: the tokenizer the data was prepared "
                         "with must stay beside it; prepare the data again")
    stored = tokenizer_hash(data.tokenizer_dir)
    if stored != manifest.tokenizer_sha256:
        raise UsageError(
            f"{data.tokenizer_dir}: this tokenizer (sha256 {stored[:12]}) is not the one the data was "
            f"prepared with ({manifest.tokenizer_sha256[:12]} in manifest.json); prepare the data again"
        )


def open_eval_data(eval_dir: Path | None, train_data: PreparedData, recipe: Recipe, where: str,
                   trained_nsp: bool) -> PreparedData:
    """The held-out data: `eval_dir`, else the training data's validation split; checked to share
    the training data's tokenizer, to fit the model's positions, and to hold sentence pairs only for a
    model trained on them (`trained_nsp`). `where` names the flag."""
    if eval_dir is None:
        manifest = train_data.manifest
        if not manifest.validation_dir:
            raise UsageError(
                f"{train_data.directory} has no held-out split (its manifest lists no validation directory) "
                f"and no {where} was given, but the recipe asks for evaluation (eval.every_steps = "
                f"{recipe.eval.every_steps}, eval.at_end = {str(recipe.eval.at_end).lower()}); prepare the data "
                f"with --validation-fraction 0.05, pass {where} DIR, or set eval.every_steps=0 and eval.at_end=false")
        eval_dir = train_data.directory / manifest.validation_dir
    data = PreparedData(eval_dir)
    if data.manifest.tokenizer_sha256 != train_data.manifest.tokenizer_sha256:
        raise UsageError(
            f"{where} {eval_dir}: prepared with another tokenizer (sha256 {data.manifest.tokenizer_sha256[:12]}) "
            f"than the model's data ({train_data.manifest.tokenizer_sha256[:12]}); prepare it with "
            f"--tokenizer {train_data.tokenizer_dir}")
    positions = recipe.model_field("max_position_embeddings")
    if data.manifest.seq_len > positions:
        raise UsageError(f"{where} {eval_dir}: sequences of {data.manifest.seq_len} tokens exceed "
                         f"model.max_position_embeddings = {positions}; prepare it with --seq-len {positions}")
    if data.has_nsp and not trained_nsp:
        # Its next-sentence head never learned (and a second segment's token type was never seen): its
        # NSP accuracy would be chance dressed up as a figure. --model refuses the same.
        raise UsageError(f"{where} {eval_dir}: holds sentence pairs (--format nsp), but the model was trained "
                         f"on {train_data.manifest.format} data without next-sentence prediction; evaluate it "
                         "on data prepared with --format mlm")
    return data


def refuse_used_run_dir(run_dir: Path, resuming: bool) -> None:
    if not resuming and (run_dir / "metrics.jsonl").exists():
        raise UsageError(f"{run_dir} already holds a run (metrics.jsonl); choose a new --output "
                         "or continue it with --resume auto")


def preflight(recipe: Recipe, output: Path, data_dir: Path | None, resume: str | None,
              eval_dir: Path | None = None) -> None:
    """What can be refused before any worker starts, without writing anything: the launchers run it
    (through `hvdbert.plan --workers N -- PRETRAIN ARGS`) before horovodrun, and rank 0 runs it before
    Horovod starts. The run re-checks all of it on rank 0 under the run directory's lock."""
    check_output_location(output)
    refuse_used_run_dir(output, resume is not None)
    check_free(output)
    if eval_dir is not None and not recipe.eval.requested:
        # A run that never evaluates would never read it: the user meant to evaluate, or passed it by mistake.
        raise UsageError(f"--eval-data {eval_dir}: the recipe asks for no evaluation (eval.every_steps = 0, "
                         "eval.at_end = false), so it would never be read; add --set eval.at_end=true or "
                         "--set eval.every_steps=N, or drop --eval-data")
    if resume not in (None, "auto"):
        checkpoint.open_checkpoint(Path(resume), verify=False)  # the sha256 sums are checked on rank 0
    if recipe.checkpoint.init_from:
        checkpoint.open_checkpoint(Path(recipe.checkpoint.init_from), verify=False)
    if data_dir is not None:
        data = PreparedData(data_dir)
        check_data(data, recipe)
        if recipe.eval.requested:  # the held-out data as the run's evaluator opens it (build_evaluator)
            open_eval_data(eval_dir, data, recipe, "--eval-data", trained_nsp=data.has_nsp)
    elif recipe.eval.requested and eval_dir is not None:
        # The embedded corpus may not be prepared yet: its tokenizer is compared on rank 0, later.
        PreparedData(eval_dir)
