"""Prepared data on disk: Arrow IPC shards of fixed-length sequences plus a manifest.

    DATA_DIR/manifest.json     counts, shard list with sha256, sequence length, format, tokenizer hash
    DATA_DIR/tokenizer/        the tokenizer the sequences were made with
    DATA_DIR/shard-00000.arrow columns: input_ids (fixed-size list), and for the nsp format
                               token_type_ids and next_sentence_label; word_start when the
                               input came with its own word segmentation (whole-word masking)
    DATA_DIR/token_counts.npy  occurrences of each token id in these sequences (int64, one per id of
                               the vocabulary, padding included): the training split's unigram
                               frequencies, the baseline evaluation reports; sha256 in manifest.json
    DATA_DIR/validation/       with --validation-fraction: the held-out documents, the same layout
                               (own manifest, a copy of the tokenizer, no token counts), named in
                               manifest.json

A directory is written under a temporary name and renamed when complete (`publish_directory`), so
an interrupted preparation never leaves anything that looks valid. Shards are memory-mapped for
reading: opening is instant and any sample is read directly by index.

Damage after preparation (a truncated copy, flipped bytes) is caught three ways: a shard that is
not a complete Arrow file is refused when the data is opened; every batch read is checked to hold
token ids of the vocabulary (cheap: one max per batch); and the first time a process reads from a
shard, a background thread computes its sha256 and compares it with the manifest's, so even
damage that stays inside the vocabulary stops the run, without making start-up wait for a
terabyte corpus to be hashed. Each stops with one line naming the shard.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from hvdbert.errors import UsageError
from hvdbert.files import file_sha256, fsync_path

MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.npy"
FORMAT_VERSION = 1
FORMATS = ("mlm", "nsp")


@dataclass
class Manifest:
    format: str  # mlm | nsp
    seq_len: int
    num_sequences: int
    num_tokens: int  # non-padding tokens, special tokens included
    token_dtype: str  # uint16 when the vocabulary fits, else int32
    vocab_size: int  # the tokenizer's
    tokenizer_sha256: str
    special_token_ids: dict[str, int]  # pad, unk, cls, sep, mask
    shards: list[dict] = field(default_factory=list)  # {file, num_sequences, num_tokens, sha256}
    source: str = ""
    format_version: int = FORMAT_VERSION
    num_documents: int = 0
    documents_per_shard: int = 0  # shard i holds documents [i x this, (i + 1) x this) of the input
    dropped_tokens: int = 0  # mlm: each shard's last, incomplete sequence
    word_segmented: bool = False  # a word_start column carries the input's own word segmentation
    invalid_utf8_lines: int = 0  # input lines whose non-UTF-8 bytes were replaced by U+FFFD
    lowercase: bool = True
    validation_fraction: float = 0.0  # of the input's documents held out (by content hash)
    validation_dir: str = ""  # the held-out split, prepared alike, relative to this directory
    # TOKEN_COUNTS's sha256; "" in a held-out split and in data prepared before the counts were stored
    token_counts_sha256: str = ""

    def write(self, directory: Path) -> None:
        (directory / MANIFEST).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = directory / MANIFEST
        if not path.is_file():
            raise UsageError(
                f"{directory} is not prepared data: {MANIFEST} is missing "
                "(make it with python -m hvdbert.prepare)"
            )
        try:
            fields = json.loads(path.read_text(encoding="utf-8"))
            manifest = cls(**fields)
        except (json.JSONDecodeError, TypeError) as error:
            raise UsageError(f"{path}: not a valid hvdbert manifest: {error}") from None
        if manifest.format_version != FORMAT_VERSION:
            raise UsageError(
                f"{path}: data format version {manifest.format_version}; this hvdbert reads version "
                f"{FORMAT_VERSION}: prepare the data again"
            )
        return manifest


def write_token_counts(directory: Path, counts: np.ndarray) -> str:
    """Write the token counts beside the manifest; returns their sha256 for it. np.save's bytes depend
    only on the array, so the file is as deterministic as the shards."""
    path = directory / TOKEN_COUNTS
    with open(path, "wb") as out:
        np.save(out, np.ascontiguousarray(counts, dtype=np.int64))
    return file_sha256(path)


def read_token_counts(directory: Path, manifest: Manifest) -> np.ndarray | None:
    """The occurrences of each token id in the sequences of `directory` (TOKEN_COUNTS, checked against
    the manifest's sha256), or None when it was prepared without them (a held-out split, or data
    prepared before they were stored)."""
    if not manifest.token_counts_sha256:
        return None
    path = directory / TOKEN_COUNTS
    if not path.is_file():
        raise UsageError(f"{directory}: {TOKEN_COUNTS} listed in {MANIFEST} is missing; copy or prepare the data again")
    digest = file_sha256(path)
    if digest != manifest.token_counts_sha256:
        raise UsageError(f"{path} is damaged: its sha256 {digest[:12]} differs from {MANIFEST}'s "
                         f"{manifest.token_counts_sha256[:12]}; copy or prepare the data again")
    counts = np.load(path, allow_pickle=False)
    if counts.shape != (manifest.vocab_size,) or counts.dtype != np.int64:
        raise UsageError(f"{path}: holds {counts.dtype} counts of shape {counts.shape}, not one int64 per token "
                         f"id of the vocabulary of {manifest.vocab_size}; prepare the data again")
    return counts


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def publish_directory(temporary: Path, final: Path) -> None:
    """fsync everything under `temporary`, then rename it to `final` (absent or empty): the complete
    directory appears at once, or not at all. If another process published `final` first, raise."""
    for path in temporary.rglob("*"):
        if path.is_file():
            fsync_path(path)
    fsync_path(temporary)
    try:
        if final.exists():
            final.rmdir()  # empty: callers refuse a non-empty output before writing anything
        os.rename(temporary, final)
        fsync_path(final.parent)  # the rename itself survives a crash
    except OSError as error:  # ENOTEMPTY: a concurrent preparer of the same directory won
        raise UsageError(f"output directory {final} was filled by another process while preparing "
                         f"({error.strerror}); choose a new one") from None


def write_shard(path: Path, blocks: Iterator[dict[str, np.ndarray]], seq_len: int, dtype: np.dtype,
                pad_id: int) -> dict:
    """Write one Arrow IPC shard from blocks of rows (one record batch per block).

    Columns: input_ids (fixed-size list of `dtype`); when present in the blocks, token_type_ids and
    word_start (fixed-size lists of uint8) and next_sentence_label (int8). Returns the shard's
    manifest entry: {file, num_sequences, num_tokens, sha256}; num_tokens counts non-padding tokens.
    """
    import pyarrow as pa

    list_types = {"input_ids": pa.from_numpy_dtype(np.dtype(dtype)), "token_type_ids": pa.uint8(),
                  "word_start": pa.uint8()}
    writer, schema = None, None
    num_sequences = num_tokens = 0
    try:
        for block in blocks:
            if writer is None:
                fields = [pa.field(name, pa.list_(list_types[name], seq_len)) for name in list_types
                          if name in block]
                if "next_sentence_label" in block:
                    fields.append(pa.field("next_sentence_label", pa.int8()))
                schema = pa.schema(fields)
                writer = pa.ipc.new_file(str(path), schema)
            arrays = []
            for column in schema:
                value = block[column.name]
                if column.name == "next_sentence_label":
                    arrays.append(pa.array(np.asarray(value, dtype=np.int8)))
                else:
                    flat = np.ascontiguousarray(value, dtype=column.type.value_type.to_pandas_dtype())
                    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), seq_len))
            writer.write_batch(pa.record_batch(arrays, schema=schema))
            num_sequences += len(block["input_ids"])
            num_tokens += int(np.count_nonzero(np.asarray(block["input_ids"]) != pad_id))
    finally:
        if writer is not None:
            writer.close()
    return {"file": Path(path).name, "num_sequences": num_sequences, "num_tokens": num_tokens,
            "sha256": file_sha256(Path(path)) if writer is not None else ""}


class ShardVerifier:
    """sha256 of shards against the manifest, one shard at a time in a background thread, each shard
    once: `request(i)` queues shard i, `check()` raises (UsageError, naming it) once one differs."""

    def __init__(self, directory: Path, shards: list[dict]):
        self.directory = directory
        self.shards = shards
        self.error: UsageError | None = None
        self._requested: set[int] = set()
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    def request(self, index: int) -> None:
        if index in self._requested:
            return
        self._requested.add(index)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True, name="hvdbert-verify")
            self._thread.start()
        self._queue.put(index)

    def _run(self) -> None:
        while self.error is None:
            index = self._queue.get()
            if index is None:
                return
            entry = self.shards[index]
            path = self.directory / entry["file"]
            try:
                digest = file_sha256(path)
            except OSError as error:
                self.error = UsageError(f"{path}: cannot read it ({error.strerror})")
                return
            if digest != entry["sha256"]:
                self.error = UsageError(f"{path} is damaged: its sha256 {digest[:12]} differs from "
                                        f"{MANIFEST}'s {entry['sha256'][:12]}; copy or prepare the data again")

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def wait(self) -> None:
        """Until every requested shard is checked (or one failed); for tools and tests."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.check()


class PreparedData:
    """Read-only, memory-mapped view of a prepared data directory; samples are read by index."""

    def __init__(self, directory: str | Path):
        import pyarrow as pa

        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise UsageError(f"data directory not found: {self.directory}")
        self.manifest = Manifest.read(self.directory)
        self.tokenizer_dir = self.directory / "tokenizer"
        self._columns: list[dict[str, np.ndarray]] = []
        self._shard_of_batch: list[int] = []
        self.verifier = ShardVerifier(self.directory, self.manifest.shards)
        self._verify_part = (0, 1)  # (k, n): this process verifies the shards i with i % n == k
        counts = []
        for shard_index, shard in enumerate(self.manifest.shards):
            path = self.directory / shard["file"]
            if not path.is_file():
                raise UsageError(f"{self.directory}: shard {shard['file']} listed in {MANIFEST} is missing")
            # Each record batch is used where it lies in the mapped file (no copy, no combine):
            # a shard is indexed as its batches, one after the other.
            try:
                reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
                batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            except (pa.ArrowInvalid, OSError) as error:
                raise UsageError(f"{path} is damaged (truncated or overwritten): not a complete Arrow file "
                                 f"({str(error).strip().splitlines()[0]}); copy or prepare the data again") from None
            rows_in_shard = sum(batch.num_rows for batch in batches)
            if rows_in_shard != shard["num_sequences"]:
                raise UsageError(
                    f"{path}: holds {rows_in_shard} sequences, {MANIFEST} says {shard['num_sequences']}"
                )
            for batch in batches:
                if batch.num_rows == 0:
                    continue
                columns = {}
                for name, column in zip(batch.schema.names, batch.columns):
                    if isinstance(column, pa.FixedSizeListArray):
                        values = column.values.to_numpy(zero_copy_only=True)
                        columns[name] = values.reshape(batch.num_rows, -1)
                    else:
                        columns[name] = column.to_numpy(zero_copy_only=True)
                self._columns.append(columns)
                self._shard_of_batch.append(shard_index)
                counts.append(batch.num_rows)
        self._offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        if self._offsets[-1] != self.manifest.num_sequences:
            raise UsageError(
                f"{self.directory}: shards hold {self._offsets[-1]} sequences, "
                f"{MANIFEST} says {self.manifest.num_sequences}"
            )
        if self.manifest.num_sequences == 0:
            raise UsageError(f"{self.directory}: the prepared data holds no sequences")

    def __len__(self) -> int:
        return self.manifest.num_sequences

    @property
    def has_nsp(self) -> bool:
        return self.manifest.format == "nsp"

    def token_counts(self) -> np.ndarray | None:
        """read_token_counts of this directory."""
        return read_token_counts(self.directory, self.manifest)

    def share_verification(self, part: int, parts: int) -> None:
        """Verify only shards i with i % parts == part: with one part per rank, each shard is hashed
        once per job rather than once per rank."""
        self._verify_part = (part, parts)

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows for global sample indices, in the given order, as int64 arrays."""
        self.verifier.check()
        indices = np.asarray(indices, dtype=np.int64)
        batch_of = np.searchsorted(self._offsets, indices, side="right") - 1
        names = self._columns[0].keys()
        out = {name: np.empty((len(indices), *self._columns[0][name].shape[1:]), dtype=np.int64)
               for name in names}
        part, parts = self._verify_part
        for batch in np.unique(batch_of):
            rows = batch_of == batch
            local = indices[rows] - self._offsets[batch]
            shard = self._shard_of_batch[batch]
            if shard % parts == part:
                self.verifier.request(shard)  # the first read of a shard starts its check
            for name in names:
                out[name][rows] = self._columns[batch][name][local]
            ids = out["input_ids"][rows]
            if ids.size and (ids.max() >= self.manifest.vocab_size or ids.min() < 0):
                raise UsageError(f"{self.directory / self.manifest.shards[shard]['file']} is damaged: it holds "
                                 f"token id {int(ids.max())}, outside the vocabulary of {self.manifest.vocab_size}; "
                                 "copy or prepare the data again")
        return out

    @property
    def has_word_starts(self) -> bool:
        """True when the shards carry the input's own word segmentation (a word_start column)."""
        return "word_start" in self._columns[0]

    def continuation_table(self) -> np.ndarray:
        """is_continuation[token id]: True for WordPiece pieces inside a word (`##...`), so that
        whole-word masking finds words without a word_start column. CJK characters are single
        tokens with no `##` form in BERT's vocabularies: each is then its own word."""
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(self.tokenizer_dir / "tokenizer.json")).get_vocab()
        table = np.zeros(max(self.manifest.vocab_size, max(vocab.values()) + 1), dtype=bool)
        for token, index in vocab.items():
            table[index] = token.startswith("##")
        return table
