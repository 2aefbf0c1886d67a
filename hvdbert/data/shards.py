"""Prepared data on disk: Arrow IPC shards of fixed-length sequences plus a manifest.

    DATA_DIR/manifest.json     counts, shard list with sha256, sequence length, format, tokenizer hash
    DATA_DIR/tokenizer/        the tokenizer the sequences were made with
    DATA_DIR/shard-00000.arrow columns: input_ids (fixed-size list), and for the nsp format
                               token_type_ids and next_sentence_label

A directory is written under a temporary name and renamed when complete (`atomic_output_dir`), so
an interrupted preparation never leaves anything that looks valid. Shards are memory-mapped for
reading: opening is instant and any sample is read directly by index.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from hvdbert.errors import UsageError

MANIFEST = "manifest.json"
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
    shards: list[dict] = field(default_factory=list)  # {file, num_sequences, sha256}
    source: str = ""
    format_version: int = FORMAT_VERSION

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


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; rename it to `final` only if the block succeeds."""
    final = Path(final)
    if final.exists() and any(final.iterdir()):
        raise UsageError(f"output directory {final} already exists and is not empty; choose a new one")
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        for path in temporary.rglob("*"):
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            final.rmdir()  # empty, checked above
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


class ShardWriter:
    """Writes fixed-length sequences into Arrow shards of about `sequences_per_shard` rows each."""

    def __init__(self, directory: Path, seq_len: int, fmt: str, dtype: np.dtype,
                 sequences_per_shard: int = 1 << 16, prefix: str = "shard"):
        import pyarrow as pa

        self.pa = pa
        self.directory = Path(directory)
        self.seq_len = seq_len
        self.format = fmt
        self.dtype = np.dtype(dtype)
        self.sequences_per_shard = sequences_per_shard
        self.prefix = prefix
        columns = [pa.field("input_ids", pa.list_(pa.from_numpy_dtype(self.dtype), seq_len))]
        if fmt == "nsp":
            columns += [
                pa.field("token_type_ids", pa.list_(pa.uint8(), seq_len)),
                pa.field("next_sentence_label", pa.int8()),
            ]
        self.schema = pa.schema(columns)
        self.shards: list[dict] = []
        self.num_tokens = 0
        self._writer = None
        self._rows_in_shard = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.arrow"
        self._path = self.directory / name
        self._writer = self.pa.ipc.new_file(str(self._path), self.schema)
        self._rows_in_shard = 0

    def _close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self.shards.append({"file": self._path.name, "num_sequences": self._rows_in_shard,
                            "sha256": file_sha256(self._path)})
        self._writer = None

    def write(self, input_ids: np.ndarray, token_type_ids: np.ndarray | None = None,
              next_sentence_label: np.ndarray | None = None, pad_id: int = 0) -> None:
        """Append a block of sequences: input_ids has shape (n, seq_len)."""
        pa = self.pa
        start = 0
        while start < len(input_ids):
            if self._writer is None:
                self._open()
            take = min(len(input_ids) - start, self.sequences_per_shard - self._rows_in_shard)
            block = slice(start, start + take)
            ids = np.ascontiguousarray(input_ids[block], dtype=self.dtype)
            arrays = [pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), self.seq_len)]
            if self.format == "nsp":
                types = np.ascontiguousarray(token_type_ids[block], dtype=np.uint8)
                arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(types.reshape(-1)), self.seq_len))
                arrays.append(pa.array(np.asarray(next_sentence_label[block], dtype=np.int8)))
            self._writer.write_batch(pa.record_batch(arrays, schema=self.schema))
            self.num_tokens += int(np.count_nonzero(ids != pad_id))
            self._rows_in_shard += take
            start += take
            if self._rows_in_shard >= self.sequences_per_shard:
                self._close()

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


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
        counts = []
        for shard in self.manifest.shards:
            path = self.directory / shard["file"]
            if not path.is_file():
                raise UsageError(f"{self.directory}: shard {shard['file']} listed in {MANIFEST} is missing")
            table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all().combine_chunks()
            if table.num_rows != shard["num_sequences"]:
                raise UsageError(
                    f"{path}: holds {table.num_rows} sequences, {MANIFEST} says {shard['num_sequences']}"
                )
            columns = {}
            for name in table.column_names:
                chunk = table.column(name).chunk(0) if table.num_rows else None
                if chunk is None:
                    continue
                if isinstance(chunk, pa.FixedSizeListArray):
                    columns[name] = chunk.values.to_numpy(zero_copy_only=True).reshape(table.num_rows, -1)
                else:
                    columns[name] = chunk.to_numpy(zero_copy_only=True)
            self._columns.append(columns)
            counts.append(table.num_rows)
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

    def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows for global sample indices, in the given order, as int64 arrays."""
        indices = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self._offsets, indices, side="right") - 1
        names = self._columns[0].keys()
        out = {name: np.empty((len(indices), *self._columns[0][name].shape[1:]), dtype=np.int64)
               for name in names}
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            local = indices[rows] - self._offsets[shard]
            for name in names:
                out[name][rows] = self._columns[shard][name][local]
        return out
