"""Prepare a corpus for pretraining: tokenize, pack into fixed-length sequences, write shards.

    python -m hvdbert.prepare --input builtin --output DATA_DIR [--vocab-size N | --tokenizer DIR]
                              [--seq-len 128] [--format mlm]
"""
from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Iterable

from hvdbert.data.corpus import builtin_documents
from hvdbert.data.packing import MlmPacker, batched
from hvdbert.data.shards import FORMATS, Manifest, PreparedData, ShardWriter, atomic_output_dir, token_dtype
from hvdbert.data.tokenizer import load_tokenizer, tokenizer_hash, train_wordpiece
from hvdbert.errors import ArgumentParser, UsageError, cli_entry

log = logging.getLogger("hvdbert.prepare")
ENCODE_BATCH_DOCUMENTS = 1000


def special_token_ids(tokenizer) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in
            (("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"))}


def prepare(documents: Iterable[str], output: Path, tokenizer, seq_len: int, fmt: str = "mlm",
            source: str = "") -> Manifest:
    """Tokenize and pack `documents` into `output` (written atomically); returns the manifest."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r} is not valid; choose one of {', '.join(FORMATS)}")
    if fmt != "mlm":
        raise UsageError(f"--format {fmt} is not available yet; use --format mlm")
    special = special_token_ids(tokenizer)
    dtype = token_dtype(len(tokenizer))
    with atomic_output_dir(Path(output)) as directory:
        tokenizer.save_pretrained(str(directory / "tokenizer"))
        writer = ShardWriter(directory, seq_len, fmt, dtype)
        packer = MlmPacker(seq_len, special["cls"], special["sep"], dtype)
        for batch in batched(documents, ENCODE_BATCH_DOCUMENTS):
            encoded = tokenizer(batch, add_special_tokens=False, return_attention_mask=False,
                                return_token_type_ids=False)["input_ids"]
            writer.write(packer.add(encoded), pad_id=special["pad"])
        packer.finish()
        shards = writer.finish()
        manifest = Manifest(
            format=fmt, seq_len=seq_len, num_sequences=sum(s["num_sequences"] for s in shards),
            num_tokens=writer.num_tokens, token_dtype=dtype.name, vocab_size=len(tokenizer),
            tokenizer_sha256=tokenizer_hash(directory / "tokenizer"), special_token_ids=special,
            shards=shards, source=source,
        )
        if manifest.num_sequences == 0:
            raise UsageError(f"{source or 'the input'} yields no complete sequence of {seq_len} tokens")
        manifest.write(directory)
    return manifest


def builtin_cache_dir(cache_root: Path, vocab_size: int, seq_len: int, max_documents: int) -> Path:
    """Where the prepared embedded corpus lives; the key covers everything that changes its content."""
    key = f"v1-{sys.version_info[0]}.{sys.version_info[1]}-vocab{vocab_size}-seq{seq_len}-docs{max_documents}"
    return cache_root / f"builtin-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare_builtin(output: Path, vocab_size: int, seq_len: int, max_documents: int = 0) -> PreparedData:
    """The embedded corpus with a WordPiece tokenizer trained on it (reused when already prepared)."""
    output = Path(output)
    if not (output / "manifest.json").is_file():
        log.warning("preparing the embedded corpus in %s (once)", output)
        tokenizer = train_wordpiece(builtin_documents(max_documents), vocab_size)
        try:
            prepare(builtin_documents(max_documents), output, tokenizer, seq_len, source="builtin")
        except UsageError:
            if not (output / "manifest.json").is_file():  # not a concurrent preparer that finished first
                raise
    return PreparedData(output)


@cli_entry("hvdbert.prepare")
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m hvdbert.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="builtin")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--tokenizer", type=Path, help="an existing tokenizer directory")
    parser.add_argument("--vocab-size", type=int, default=30522, help="when training a tokenizer")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--format", default="mlm", choices=FORMATS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.input != ["builtin"]:
        raise UsageError("--input: only `builtin` is available yet")
    tokenizer = (load_tokenizer(args.tokenizer) if args.tokenizer
                 else train_wordpiece(builtin_documents(), args.vocab_size))
    manifest = prepare(builtin_documents(), args.output, tokenizer, args.seq_len, args.format, source="builtin")
    print(f"wrote {manifest.num_sequences} sequences of {manifest.seq_len} tokens "
          f"({manifest.num_tokens} tokens) in {len(manifest.shards)} shards to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
