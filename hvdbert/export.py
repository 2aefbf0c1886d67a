"""Export a checkpoint as a transformers model directory (save_pretrained, safetensors) with its tokenizer.

    python -m hvdbert.export --run RUN_DIR --output HF_DIR [--checkpoint CHECKPOINT_DIR]

The newest complete checkpoint of RUN_DIR is exported unless --checkpoint names one. The result loads
offline with `AutoModelForMaskedLM.from_pretrained(HF_DIR)`, `pipeline("fill-mask", model=HF_DIR)`,
and, when the run trained next-sentence prediction, `BertForPreTraining.from_pretrained(HF_DIR)`.
MLM-only runs are written as BertForMaskedLM: their pooler and NSP head were never trained.
ModernBERT runs (model.architecture = modernbert) are written as ModernBertForMaskedLM, the class
they trained as, with the config naming their tokenizer's special token ids and
`classifier_pooling = "mean"` (masked LM alone never trains the first token's output). Every export's
config records `pretraining_max_seq_len`, the sequence length the run trained at.
"""
from __future__ import annotations

if __name__ == "__main__":  # the program: a Ctrl-C while torch imports is one line, not a traceback
    from hvdbert.errors import quiet_interrupts

    quiet_interrupts("hvdbert.export")

import os
import shutil
import sys
from pathlib import Path

from hvdbert import checkpoint, families
from hvdbert.data.tokenizer import load_tokenizer, tokenizer_hash
from hvdbert.errors import ArgumentParser, UsageError, cli_entry
from hvdbert.files import check_output_location


# The config.json key every export writes: the sequence length the run trained at. Positions past it
# are untrained, so hvdbert.finetune cuts its examples there.
PRETRAINING_LENGTH = "pretraining_max_seq_len"


def build_exported(found: checkpoint.Checkpoint):
    """The transformers model holding `found`'s weights: what its family exports (BertForPreTraining,
    BertForMaskedLM or ModernBertForMaskedLM)."""
    fields = found.recipe["model"]
    model = families.model_class(fields)(families.build_config(fields))
    checkpoint.load_weights(model, found.weights(), found.path / checkpoint.WEIGHTS)
    model = families.family_of(fields).hooks.exported(model, found.recipe.get("with_nsp", False), found.path)
    model.config.architectures = [type(model).__name__]
    setattr(model.config, PRETRAINING_LENGTH, found.recipe.get("data", {}).get("max_seq_len"))
    return model.eval()


# How to name another tokenizer, from the command that exports: its own flag, as the default says, or,
# for a command without one (finetune), an export first.
CHOOSE_TOKENIZER = "pass --tokenizer DIR"


def check_vocabulary(found: checkpoint.Checkpoint, tokenizer_dir: Path, tokenizer,
                     choose: str = CHOOSE_TOKENIZER) -> None:
    """Refuse a tokenizer whose ids are not the ones the model was trained on: the export would load
    and run, and predict nonsense. The checkpoint records the sha256 of its data's tokenizer; another
    copy of the same vocabulary (a re-saved tokenizer) is compared token by token with the data's.
    `choose` says how to name another tokenizer (DIR: where it goes)."""
    trained = found.state.get("tokenizer_sha256")
    if not trained or tokenizer_hash(tokenizer_dir) == trained:
        return
    data_tokenizer = Path(found.recipe.get("data_dir", "")) / "tokenizer"
    if data_tokenizer.is_dir() and tokenizer_hash(data_tokenizer) == trained:
        if load_tokenizer(data_tokenizer).get_vocab() == tokenizer.get_vocab():
            return
        raise UsageError(f"tokenizer {tokenizer_dir} has another vocabulary than the one {found.path} was "
                         f"trained with ({data_tokenizer}); {choose.replace('DIR', str(data_tokenizer))}")
    raise UsageError(f"tokenizer {tokenizer_dir} is not the tokenizer {found.path} was trained with "
                     f"(sha256 {trained[:12]}); {choose} (DIR: the prepared data's tokenizer, DATA_DIR/tokenizer)")


def export(found: checkpoint.Checkpoint, tokenizer_dir: Path, output: Path, choose: str = CHOOSE_TOKENIZER) -> str:
    """Write model and tokenizer to a temporary directory beside `output`, then rename it; returns
    the transformers class written. `choose`: how the calling command names another tokenizer."""
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"--output {output} already exists and is not empty; choose a new directory")
    if not (tokenizer_dir / "tokenizer_config.json").is_file() and not (tokenizer_dir / "tokenizer.json").is_file():
        raise UsageError(f"tokenizer not found in {tokenizer_dir} (the run's DATA_DIR/tokenizer); {choose}")
    model = build_exported(found)
    tokenizer = load_tokenizer(tokenizer_dir)
    check_vocabulary(found, tokenizer_dir, tokenizer, choose)
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        model.save_pretrained(str(temporary))  # safetensors
        tokenizer.save_pretrained(str(temporary))
        if output.exists():
            output.rmdir()  # empty, checked above
        os.rename(temporary, output)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return type(model).__name__


@cli_entry("hvdbert.export")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m hvdbert.export", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, type=Path, help="run directory (hvdbert.pretrain --output)")
    parser.add_argument("--output", required=True, type=Path, help="new transformers model directory")
    parser.add_argument("--checkpoint", type=Path, help="export this checkpoint instead of the newest one")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: DATA_DIR/tokenizer of the run)")
    args = parser.parse_args(argv)
    check_output_location(args.output)
    found = checkpoint.checkpoint_of_run(args.run, args.checkpoint)
    tokenizer_dir = args.tokenizer or Path(found.recipe.get("data_dir", "")) / "tokenizer"
    kind = export(found, tokenizer_dir, args.output)
    print(f"hvdbert: exported {found.path} (step {found.step}) to {args.output} as {kind} with its tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
