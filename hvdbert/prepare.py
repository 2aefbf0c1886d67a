"""Prepare a corpus for pretraining: tokenize, pack into fixed-length sequences, write shards.

    python -m hvdbert.prepare --input PATH... | builtin --output DATA_DIR [--tokenizer DIR | --vocab-size N]
                              [--seq-len 128] [--format mlm|nsp] [--text-field NAME] [--num-proc N]
    mpirun -np K python -m hvdbert.prepare ...   (the same, split across K processes or machines)

The rule that makes the result independent of how many processes prepared it: the input's
documents, in order, are cut into blocks of --documents-per-shard documents; block i becomes shard
i, packed on its own (mlm packing restarts at every block; nsp draws its random next sentences from
the same block, with a random generator seeded by (seed, i)). Worker w of W prepares the blocks
i with i % W == w, every worker reads (but does not tokenize) the whole input, and the manifest lists
the shards by block number. K MPI ranks with N processes each are W = K x N workers.

With --validation-fraction F, documents whose content hash falls in the first F of the hash range
are held out (hvdbert/data/split.py): the rest are blocked, packed and written as above, and the
held-out ones the same way into DATA_DIR/validation/ (its own manifest, the same tokenizer). The
tokenizer is trained on the training documents only.
"""
from __future__ import annotations

if __name__ == "__main__":  # the program: a Ctrl-C while torch imports is one line, not a traceback
    from hvdbert.errors import quiet_interrupts

    quiet_interrupts("hvdbert.prepare")

import argparse
import fcntl
import functools
import hashlib
import itertools
import logging
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from hvdbert.data.inputs import FILE_FORMATS, TEXT_MODES, ReadStats, Source, check_readable, iter_documents, resolve_inputs
from hvdbert.data.packing import MlmPacker, batched, nsp_pairs, split_sentences
from hvdbert.data.shards import (FORMATS, Manifest, PreparedData, publish_directory, token_dtype, write_shard,
                                 write_token_counts)
from hvdbert.data.split import VALIDATION_DIR, SplitDocuments
from hvdbert.data.tokenizer import SPECIAL_TOKENS, load_tokenizer, tokenizer_hash, train_wordpiece
from hvdbert.errors import ArgumentParser, UsageError, cli_entry, rank_zero_decides
from hvdbert.files import check_output_location
from hvdbert.launcher import mpi_world_size

log = logging.getLogger("hvdbert.prepare")
ENCODE_BATCH_DOCUMENTS = 1000
DEFAULT_DOCUMENTS_PER_SHARD = 10_000
# The WordPiece trainer reserves memory for the vocabulary asked for, about 66 bytes a token
# (2**28 asked 17.7 GB and aborted the process); 2**21 is twice XLM-V's 901,629 tokens, the largest
# vocabulary of a BERT-family model we know of.
MAX_VOCAB_SIZE = 1 << 21
# The embedded corpus holds out 5% of its documents, run_mlm.py's validation_split_percentage default.
BUILTIN_VALIDATION_FRACTION = 0.05


@dataclass(frozen=True)
class Options:
    """Everything a preparing worker needs; picklable, so --num-proc workers receive it whole."""

    sources: tuple[Source, ...]
    seq_len: int = 128
    format: str = "mlm"
    text_field: str = "text"
    text_mode: str = "blank-lines"
    word_segmented: bool = False  # words are separated by spaces in the input (e.g. segmented Chinese)
    documents_per_shard: int = DEFAULT_DOCUMENTS_PER_SHARD
    short_seq_prob: float = 0.1  # nsp: Devlin et al. 2018
    seed: int = 12345  # nsp: random next sentences and short targets
    builtin_max_documents: int = 0
    validation_fraction: float = 0.0  # of documents, held out by content hash (data/split.py)


class Encoder:
    """Token ids (and word starts) of many texts at once with the Rust tokenizer."""

    def __init__(self, tokenizer_dir: Path, word_segmented: bool):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
        self.backend.no_truncation()
        self.backend.no_padding()
        self.word_segmented = word_segmented

    def encode(self, texts: list[str]) -> tuple[list[list[int]], list[np.ndarray] | None]:
        if not self.word_segmented:
            # encode_batch_fast skips character offsets: the fastest path, and all mlm needs.
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)], None
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        return [e.ids for e in encodings], [_segmented_word_starts(t, e) for t, e in zip(texts, encodings)]


def _is_cjk(char: str) -> bool:
    code = ord(char)  # the ranges BERT's tokenizer treats as Chinese characters (_is_chinese_char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2B81F or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def _segmented_word_starts(text: str, encoding) -> np.ndarray:
    """Word starts for text whose words are separated by spaces (a user's segmentation, e.g. from
    jieba or LTP for Chinese): BERT splits every CJK character into its own token, and a CJK
    character continues the word of the CJK character right before it when no space separates them
    (Cui et al. 2019). Other tokens start a word unless they are `##` pieces."""
    starts = np.ones(len(encoding.ids), dtype=np.uint8)
    previous_end, previous_cjk = -1, False
    for k, (token, (begin, end)) in enumerate(zip(encoding.tokens, encoding.offsets)):
        cjk = end - begin == 1 and _is_cjk(text[begin])
        if token.startswith("##") or (cjk and previous_cjk and begin == previous_end):
            starts[k] = 0
        previous_end, previous_cjk = end, cjk
    return starts


def owned_blocks(documents: Iterable[str], documents_per_shard: int, worker: int,
                 workers: int) -> Iterator[tuple[int, list[str]]]:
    """(block index, documents) for the blocks this worker prepares; the others are only counted."""
    block: list[str] = []
    index = 0
    for position, document in enumerate(documents):
        index = position // documents_per_shard
        if index % workers == worker:
            block.append(document)
            if len(block) == documents_per_shard:
                yield index, block
                block = []
    if block:
        yield index, block


def _mlm_blocks(documents: list[str], encoder: Encoder, packer: MlmPacker) -> Iterator[dict[str, np.ndarray]]:
    for batch in batched(documents, ENCODE_BATCH_DOCUMENTS):
        ids, starts = encoder.encode(batch)
        sequences, sequence_starts = packer.add(ids, starts)
        block = {"input_ids": sequences}
        if sequence_starts is not None:
            block["word_start"] = sequence_starts
        if len(sequences):
            yield block
    packer.finish()  # packing restarts at every shard: its result depends on this block only


def _nsp_block(documents: list[str], encoder: Encoder, options: Options, special: dict[str, int],
               shard: int) -> dict[str, np.ndarray]:
    sentences = [split_sentences(d) for d in documents]
    flat = [s for doc in sentences for s in doc]
    ids, starts = encoder.encode(flat) if flat else ([], [])
    encoded, k = [], 0
    for doc in sentences:
        segments = []
        for _ in doc:
            row_ids = np.asarray(ids[k], dtype=np.int64)
            row_starts = (np.asarray(starts[k], dtype=np.int64) if starts is not None
                          else np.ones(len(row_ids), dtype=np.int64))
            if len(row_ids):
                segments.append(np.stack([row_ids, row_starts]))
            k += 1
        if segments:
            encoded.append(segments)
    rng = np.random.default_rng([options.seed, shard])  # per block: the same whoever prepares it
    pairs = nsp_pairs(encoded, options.seq_len, rng, special["cls"], special["sep"], special["pad"],
                      options.short_seq_prob)
    if not options.word_segmented:
        del pairs["word_start"]  # derived from the vocabulary at load time instead
    return pairs


def prepare_part(worker: int, workers: int, options: Options, directory: Path) -> tuple[list[tuple[int, dict]], dict]:
    """Write this worker's shards into `directory` (and its held-out shards into directory/validation);
    returns [(block index, shard entry)] and counts (counts["validation"]: the same for the held-out)."""
    entries, counts = _prepare_split(worker, workers, options, directory, directory, held_out=False)
    if options.validation_fraction > 0:
        counts["validation"] = _prepare_split(worker, workers, options, directory, directory / VALIDATION_DIR,
                                              held_out=True)
    return entries, counts


def _prepare_split(worker: int, workers: int, options: Options, directory: Path, shard_dir: Path,
                   held_out: bool) -> tuple[list[tuple[int, dict]], dict]:
    tokenizer_dir = directory / "tokenizer"
    encoder = Encoder(tokenizer_dir, options.word_segmented)
    special = special_token_ids(tokenizer_dir)
    dtype = token_dtype(encoder.backend.get_vocab_size())
    stats = ReadStats()
    documents = SplitDocuments(iter_documents(list(options.sources), options.text_field, options.text_mode, stats,
                                              options.builtin_max_documents), options.validation_fraction, held_out)
    entries, dropped_tokens = [], 0
    token_counts = np.zeros(encoder.backend.get_vocab_size(), dtype=np.int64)  # what the shards hold
    for shard, block in owned_blocks(documents, options.documents_per_shard, worker, workers):
        path = shard_dir / f"shard-{shard:05d}.arrow"
        if options.format == "mlm":
            packer = MlmPacker(options.seq_len, special["cls"], special["sep"], dtype)
            rows = _mlm_blocks(block, encoder, packer)
        else:
            rows = iter([_nsp_block(block, encoder, options, special, shard)])
        entry = write_shard(path, _counted(rows, token_counts), options.seq_len, dtype, special["pad"])
        if options.format == "mlm":
            dropped_tokens += packer.dropped_tokens
        entry["num_documents"] = len(block)
        if entry["num_sequences"]:
            entries.append((shard, entry))
        else:
            path.unlink(missing_ok=True)  # too little text for one sequence: no shard
    counts = {"num_documents": stats.documents, "split_documents": documents.count,
              "dropped_tokens": dropped_tokens, "invalid_utf8_lines": dict(stats.invalid_utf8_lines),
              "token_counts": token_counts}
    return entries, counts


def _counted(blocks: Iterator[dict[str, np.ndarray]], token_counts: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
    """`blocks`, adding each block's token ids to `token_counts` as it passes to the shard writer."""
    for block in blocks:
        token_counts += np.bincount(np.asarray(block["input_ids"]).ravel(), minlength=token_counts.size)
        yield block


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return {name: backend.token_to_id(token) for name, token in
            (("pad", "[PAD]"), ("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"))}


def _part_in_subprocess(arguments) -> tuple[str, object]:
    worker, workers, options, directory = arguments
    try:
        return "ok", prepare_part(worker, workers, options, directory)
    except UsageError as error:
        return "error", str(error)


class _OneProcess:
    """The slice of mpi4py's communicator interface prepare uses, for a run without mpirun."""

    rank, size = 0, 1

    def bcast(self, value, root=0):
        return value

    def gather(self, value, root=0):
        return [value]


def communicator():
    """mpi4py's COMM_WORLD under mpirun (K > 1 processes), else a one-process stand-in."""
    if mpi_world_size() <= 1:
        return _OneProcess()
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _run_local_parts(comm, num_proc: int, options: Options, directory: Path):
    """This rank's workers: rank r runs workers r x num_proc ... r x num_proc + num_proc - 1."""
    workers = comm.size * num_proc
    jobs = [(comm.rank * num_proc + i, workers, options, directory) for i in range(num_proc)]
    if num_proc == 1:
        return [_part_in_subprocess(jobs[0])]
    # spawn, not fork: the Rust tokenizer's thread pool does not survive a fork
    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        return pool.map(_part_in_subprocess, jobs)


def _setup_tokenizer(directory: Path, tokenizer_dir: Path | None, vocab_size: int, lowercase: bool,
                     options: Options, tokenizer_documents: int):
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        def documents():  # a fresh pass over the input each call: the trainer reads it twice
            read = iter(SplitDocuments(iter_documents(list(options.sources), options.text_field, options.text_mode,
                                                      builtin_max_documents=options.builtin_max_documents),
                                       options.validation_fraction, held_out=False))  # never the held-out text
            return itertools.islice(read, tokenizer_documents) if tokenizer_documents else read

        tokenizer = train_wordpiece(documents, vocab_size, lowercase)
    if len(tokenizer) > 1 << 31:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens; at most 2**31 are supported")
    if tokenizer_dir is None and len(tokenizer) > vocab_size:
        # WordPiece keeps every character of the corpus whatever the size asked for
        raise UsageError(f"--vocab-size {vocab_size} is too small for this corpus: its characters and the "
                         f"{len(SPECIAL_TOKENS)} special tokens alone make {len(tokenizer)} tokens; choose at "
                         f"least {len(tokenizer)} (model.vocab_size for the embedded corpus)")
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    return tokenizer


def prepare(options: Options, output: Path, tokenizer_dir: Path | None = None, vocab_size: int = 30522,
            lowercase: bool = True, num_proc: int = 1, tokenizer_documents: int = 0, source: str = "",
            comm=None) -> Manifest | None:
    """Prepare `options.sources` into `output`, atomically. Under mpirun every rank calls this; rank 0
    sets up the tokenizer and writes the manifest once every rank's shards are complete. Returns the
    manifest (on rank 0; None on the others)."""
    comm = comm if comm is not None else communicator()
    if options.format not in FORMATS:
        raise UsageError(f"--format {options.format!r} is not valid; choose one of {', '.join(FORMATS)}")
    output = Path(output)
    broadcast = functools.partial(comm.bcast, root=0)  # Horovod-free: prepare needs only mpi4py

    def start() -> str:  # rank 0: check the input, set up the tokenizer in a fresh partial directory
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            raise UsageError(f"--output {output} already exists and is not empty; choose a new directory")
        check_readable(list(options.sources), options.text_field)
        output.parent.mkdir(parents=True, exist_ok=True)
        temporary = output.parent / f".{output.name}.partial-{os.getpid()}"
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir()
        try:
            _setup_tokenizer(temporary, tokenizer_dir, vocab_size, lowercase, options, tokenizer_documents)
            if options.validation_fraction > 0:  # a prepared directory of its own: --eval-data takes it
                shutil.copytree(temporary / "tokenizer", temporary / VALIDATION_DIR / "tokenizer")
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        return str(temporary)

    directory = Path(rank_zero_decides(comm.rank, broadcast, start))

    try:
        results = _run_local_parts(comm, num_proc, options, directory)
    except BaseException as error:  # an unexpected failure: still reach the gather, then fail
        results = [("error", f"{type(error).__name__}: {error}")]
    gathered = comm.gather(results, root=0)  # every rank's shards are complete past this point

    def finish() -> Manifest:  # rank 0: every rank's shards are complete; write the manifest, publish
        try:
            errors = [message for rank_results in gathered for status, message in rank_results if status == "error"]
            if errors:
                raise UsageError(errors[0])
            return _finish([r for rank_results in gathered for r in rank_results], directory, output, options,
                           source, lowercase)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    manifest = rank_zero_decides(comm.rank, broadcast, finish)
    return manifest if comm.rank == 0 else None


def _finish(results, directory: Path, output: Path, options: Options, source: str, lowercase: bool) -> Manifest:
    """Rank 0, after every worker: check, write the manifest, make the directory visible."""
    entries = sorted(entry for _, (part_entries, _) in results for entry in part_entries)
    counts = results[0][1][1]  # every worker read the whole input: any one's counts are the total's
    stats = ReadStats(counts["num_documents"], counts["invalid_utf8_lines"])
    stats.warn()
    if stats.documents == 0:
        raise UsageError(f"{source or 'the input'}: holds no text (no non-empty document)")
    if sum(entry["num_sequences"] for _, entry in entries) == 0:
        raise UsageError(f"{source or 'the input'}: {stats.documents} documents yield no complete "
                         f"sequence of {options.seq_len} tokens; give more text or a smaller --seq-len")
    split = options.validation_fraction > 0
    # The training sequences' token counts (never the held-out ones'): the unigram predictor that
    # evaluation reports as a baseline is fitted on them. Integer sums: the same for any split of work.
    token_counts = sum(part[1]["token_counts"] for _, part in results)
    manifest = _manifest(directory, entries, options, source, lowercase,
                         token_counts_sha256=write_token_counts(directory, token_counts),
                         num_documents=counts["split_documents"] if split else stats.documents,
                         dropped_tokens=sum(part[1]["dropped_tokens"] for _, part in results),
                         invalid_utf8_lines=sum(stats.invalid_utf8_lines.values()),
                         validation_fraction=options.validation_fraction, validation_dir=VALIDATION_DIR if split else "")
    if split:
        parts = [part[1]["validation"] for _, part in results]  # (entries, counts) of each worker
        held_out = sorted(entry for part_entries, _ in parts for entry in part_entries)
        held_out_documents = parts[0][1]["split_documents"]  # every worker counted the whole input
        if not sum(entry["num_sequences"] for _, entry in held_out):
            raise UsageError(f"{source or 'the input'}: the {held_out_documents} held-out documents "
                             f"(--validation-fraction {options.validation_fraction}) yield no complete sequence "
                             f"of {options.seq_len} tokens; raise --validation-fraction")
        _manifest(directory / VALIDATION_DIR, held_out, options, f"{source} (held out)", lowercase,
                  num_documents=held_out_documents,
                  dropped_tokens=sum(part_counts["dropped_tokens"] for _, part_counts in parts),
                  invalid_utf8_lines=0, validation_fraction=options.validation_fraction, validation_dir="")
    manifest.write(directory)  # last: the training manifest lists a complete validation directory
    publish_directory(directory, output)
    return manifest


def _manifest(directory: Path, entries: list[tuple[int, dict]], options: Options, source: str, lowercase: bool,
              **counts) -> Manifest:
    """The manifest of the shards `entries` in `directory` (written there unless it is the top one)."""
    from tokenizers import Tokenizer

    tokenizer_dir = directory / "tokenizer"
    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    manifest = Manifest(
        format=options.format, seq_len=options.seq_len,
        num_sequences=sum(entry["num_sequences"] for _, entry in entries),
        num_tokens=sum(entry["num_tokens"] for _, entry in entries),
        token_dtype=token_dtype(vocab_size).name, vocab_size=vocab_size,
        tokenizer_sha256=tokenizer_hash(tokenizer_dir), special_token_ids=special_token_ids(tokenizer_dir),
        shards=[entry for _, entry in entries], source=source,
        documents_per_shard=options.documents_per_shard, word_segmented=options.word_segmented,
        lowercase=lowercase, **counts,
    )
    if directory.name == VALIDATION_DIR:
        manifest.write(directory)
    return manifest


def builtin_cache_dir(cache_root: Path, vocab_size: int, seq_len: int, max_documents: int) -> Path:
    """Where the prepared embedded corpus lives; the key covers everything that changes its content."""
    # v5: the prepared corpus carries the training split's token counts (an older cache has none)
    key = (f"v5-{sys.version_info[0]}.{sys.version_info[1]}-vocab{vocab_size}-seq{seq_len}-docs{max_documents}"
           f"-block{DEFAULT_DOCUMENTS_PER_SHARD}-heldout{BUILTIN_VALIDATION_FRACTION}")
    return cache_root / f"builtin-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def prepare_builtin(output: Path, vocab_size: int, seq_len: int, max_documents: int = 0) -> PreparedData:
    """The embedded corpus with a WordPiece tokenizer trained on it (reused when already prepared), with
    BUILTIN_VALIDATION_FRACTION of its documents held out in output/validation."""
    output = Path(output)
    if not (output / "manifest.json").is_file():
        output.parent.mkdir(parents=True, exist_ok=True)
        # Callers on one host (elastic workers, which cannot wait at a barrier) take turns: the
        # first prepares, the others find the manifest. Where the file system has no locks, each
        # prepares into a partial directory of its own and the first to finish publishes it.
        with open(output.parent / f".{output.name}.lock", "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:
                pass
            if not (output / "manifest.json").is_file():
                log.warning("preparing the embedded corpus in %s (once)", output)
                options = Options(sources=(Source("builtin", "builtin"),), seq_len=seq_len,
                                  builtin_max_documents=max_documents, validation_fraction=BUILTIN_VALIDATION_FRACTION)
                try:
                    prepare(options, output, vocab_size=vocab_size, source="builtin", comm=_OneProcess())
                except UsageError:
                    if not (output / "manifest.json").is_file():  # not a concurrent preparer that finished first
                        raise
    return PreparedData(output)


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m hvdbert.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="files, directories, globs, `builtin`, or hf:NAME[:CONFIG] (a hub dataset)")
    parser.add_argument("--output", required=True, type=Path, help="the prepared data directory (new)")
    parser.add_argument("--tokenizer", type=Path, help="an existing tokenizer directory (e.g. bert-base-uncased)")
    parser.add_argument("--vocab-size", type=int, default=30522, help="when training a WordPiece tokenizer")
    parser.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True,
                        help="when training a tokenizer: lowercase and strip nothing else (default: on)")
    parser.add_argument("--tokenizer-documents", type=int, default=0,
                        help="train the tokenizer on the first N documents (0: all)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--format", default="mlm", choices=FORMATS,
                        help="mlm: packed contiguous text; nsp: BERT sentence pairs")
    parser.add_argument("--input-format", default="auto", choices=FILE_FORMATS,
                        help="how to read files: auto (by suffix: .jsonl/.json, .parquet, else text)")
    parser.add_argument("--text-field", default="text", help="JSON lines / parquet / datasets column")
    parser.add_argument("--text-documents", default="blank-lines", choices=TEXT_MODES,
                        help="plain text: one document per line, or documents separated by blank lines")
    parser.add_argument("--word-segmented", action="store_true",
                        help="words are separated by spaces (segmented Chinese): whole-word masking uses them")
    parser.add_argument("--documents-per-shard", type=int, default=DEFAULT_DOCUMENTS_PER_SHARD)
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--seed", type=int, default=12345, help="nsp: random next sentences")
    parser.add_argument("--short-seq-prob", type=float, default=0.1, help="nsp: Devlin et al. 2018")
    parser.add_argument("--builtin-max-documents", type=int, default=0, help="`builtin` only: 0 takes all")
    parser.add_argument("--validation-fraction", type=float, default=0.0, metavar="F",
                        help="hold out this fraction of the documents (chosen by content hash) in "
                             "DATA_DIR/validation/ for evaluation (default: 0, none)")
    args = parser.parse_args(argv)
    for name in ("vocab_size", "documents_per_shard", "num_proc"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be greater than 0")
    if args.vocab_size > MAX_VOCAB_SIZE:
        raise UsageError(f"--vocab-size {args.vocab_size}: at most {MAX_VOCAB_SIZE} tokens are supported")
    check_output_location(args.output)
    if args.seq_len < 8:
        raise UsageError(f"--seq-len {args.seq_len}: must be at least 8")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise UsageError(f"--validation-fraction {args.validation_fraction}: must be in [0, 1), e.g. 0.05")
    if not 0.0 <= args.short_seq_prob <= 1.0:
        raise UsageError(f"--short-seq-prob {args.short_seq_prob}: must be in [0, 1]")
    return args


@cli_entry("hvdbert.prepare")
def main(argv: list[str] | None = None) -> int:
    comm = communicator()
    try:
        return _main(parse_args(argv), comm)
    except UsageError:
        if comm.rank != 0:  # under mpirun every rank fails alike; rank 0 alone says why
            raise SystemExit(2) from None
        raise


def _main(args, comm) -> int:
    logging.basicConfig(level=logging.INFO if comm.rank == 0 else logging.ERROR, format="%(message)s")
    sources = resolve_inputs(args.input, args.input_format)
    options = Options(
        sources=tuple(sources), seq_len=args.seq_len, format=args.format, text_field=args.text_field,
        text_mode=args.text_documents, word_segmented=args.word_segmented,
        documents_per_shard=args.documents_per_shard, short_seq_prob=args.short_seq_prob, seed=args.seed,
        builtin_max_documents=args.builtin_max_documents, validation_fraction=args.validation_fraction,
    )
    manifest = prepare(options, args.output, args.tokenizer, args.vocab_size, args.lowercase, args.num_proc,
                       args.tokenizer_documents, source=" ".join(args.input), comm=comm)
    if manifest is not None:
        print(f"wrote {manifest.num_sequences} sequences of {manifest.seq_len} tokens "
              f"({manifest.num_tokens} tokens, {manifest.num_documents} documents, {manifest.format}) "
              f"in {len(manifest.shards)} shards to {args.output}", flush=True)
        if manifest.validation_dir:
            held_out = Manifest.read(args.output / manifest.validation_dir)
            print(f"held out {held_out.num_documents} documents ({held_out.num_sequences} sequences) in "
                  f"{args.output / manifest.validation_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
