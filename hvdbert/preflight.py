"""What a run's command line can be refused for before any worker starts, without writing anything.

The launchers run `preflight` (through `hvdbert.plan --output ...`) before horovodrun, and rank 0 of
`hvdbert.pretrain` runs it before Horovod starts; the run re-checks all of it on rank 0 under the run
directory's lock. It needs the recipe, the data's manifest and the checkpoints' state files: it loads
no model, optimizer or data preparation, so the launchers' check stays quick.
"""
from __future__ import annotations

from pathlib import Path

from hvdbert import checkpoint
from hvdbert.config import Recipe
from hvdbert.data.shards import PreparedData
from hvdbert.data.tokenizer import tokenizer_hash
from hvdbert.errors import UsageError
from hvdbert.files import check_output_location
from hvdbert.runlock import check_free


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


def refuse_used_run_dir(run_dir: Path, resuming: bool) -> None:
    if not resuming and (run_dir / "metrics.jsonl").exists():
        raise UsageError(f"{run_dir} already holds a run (metrics.jsonl); choose a new --output "
                         "or continue it with --resume auto")


def preflight(recipe: Recipe, output: Path, data_dir: Path | None, resume: str | None) -> None:
    """What can be refused before any worker starts, without writing anything: the launchers run it
    (through `hvdbert.plan --output ...`) before horovodrun, and rank 0 runs it before Horovod
    starts. The run re-checks all of it on rank 0 under the run directory's lock."""
    check_output_location(output)
    refuse_used_run_dir(output, resume is not None)
    check_free(output)
    if resume not in (None, "auto"):
        checkpoint.open_checkpoint(Path(resume), verify=False)  # the sha256 sums are checked on rank 0
    if recipe.checkpoint.init_from:
        checkpoint.open_checkpoint(Path(recipe.checkpoint.init_from), verify=False)
    if data_dir is not None:
        check_data(PreparedData(data_dir), recipe)
