"""Corpus inputs: resolve `--input` arguments to sources and stream their documents, in a fixed order.

An input is `builtin` (the embedded corpus), a file, a directory, a glob, or `hf:NAME[:CONFIG]` (a
hub dataset, passed to `datasets.load_dataset(..., streaming=True)`; needs a reachable hub). Files
by extension, unless --input-format says otherwise: .jsonl/.json (JSON lines, one document per line, text under --text-field), .parquet
(read with `datasets`, column --text-field), anything else is plain text. A directory written by
`datasets.save_to_disk` is read with `datasets.load_from_disk`; any other directory is searched
recursively for files. Globs and directories are expanded in sorted order, so the document stream
(and hence the prepared data) does not depend on the file system's listing order.

Everything streams: no input is ever held in memory whole. Plain text is read as bytes, line by line;
a line that is not valid UTF-8 is decoded with U+FFFD replacements and counted (a warning names
the file). Every problem that can be found before writing is found by `resolve_inputs`.
"""
from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from hvdbert.errors import UsageError

log = logging.getLogger("hvdbert.prepare")

TEXT_MODES = ("lines", "blank-lines")  # one document per line | documents separated by blank lines
JSON_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
SKIPPED_NAMES = {"dataset_info.json", "state.json"}  # datasets metadata, never corpus text
# A document longer than this (blank-lines mode on a file without blank lines, say) is cut at a line
# boundary, so one huge "document" never has to fit in memory.
MAX_DOCUMENT_CHARS = 1 << 20


@dataclass(frozen=True)
class Source:
    kind: str  # builtin | text | jsonl | parquet | saved | hub
    location: str  # a path, or the hub name
    config: str = ""  # hub dataset configuration


@dataclass
class ReadStats:
    """What reading found; counted over the whole input on every worker (all read everything)."""

    documents: int = 0
    invalid_utf8_lines: dict[str, int] = field(default_factory=dict)  # file -> lines with bad bytes

    def warn(self) -> None:
        for path, lines in self.invalid_utf8_lines.items():
            log.warning("%s: %d line(s) held bytes that are not UTF-8; they were replaced by U+FFFD",
                        path, lines)


def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file()


FILE_FORMATS = ("auto", "text", "jsonl", "parquet")  # auto: by suffix


def _file_source(path: Path, file_format: str = "auto") -> Source:
    if file_format != "auto":
        return Source(file_format, str(path))
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return Source("jsonl", str(path))
    if suffix in PARQUET_SUFFIXES:
        return Source("parquet", str(path))
    return Source("text", str(path))


def _directory_sources(directory: Path, file_format: str) -> list[Source]:
    if _is_saved_dataset(directory):
        return [Source("saved", str(directory))]
    sources = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).parts
        if any(part.startswith(".") for part in relative) or path.name in SKIPPED_NAMES:
            continue
        sources.append(_file_source(path, file_format))
    return sources


def resolve_inputs(inputs: list[str], file_format: str = "auto") -> list[Source]:
    """Turn --input arguments into sources; a missing path or an empty expansion is an error.
    `file_format` forces how files are read (WikiExtractor's JSON files have no suffix, say)."""
    sources: list[Source] = []
    for text in inputs:
        if text == "builtin":
            sources.append(Source("builtin", "builtin"))
        elif text.startswith("hf:"):
            name, _, config = text[3:].partition(":")
            if not name:
                raise UsageError(f"--input {text!r}: write hf:NAME or hf:NAME:CONFIG for a hub dataset")
            sources.append(Source("hub", name, config))
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UsageError(f"--input {text!r}: the pattern matches no file")
            for match in matches:
                path = Path(match)
                sources.extend(_directory_sources(path, file_format) if path.is_dir()
                               else [_file_source(path, file_format)])
        else:
            path = Path(text)
            if path.is_dir():
                found = _directory_sources(path, file_format)
                if not found:
                    raise UsageError(f"--input {text}: the directory holds no input file")
                sources.extend(found)
            elif path.is_file():
                sources.append(_file_source(path, file_format))
            else:
                raise UsageError(
                    f"--input {text}: no such file or directory (give files, directories, globs, "
                    "`builtin`, or hf:NAME for a hub dataset)"
                )
    return sources


def _text_lines(path: str, stats: ReadStats) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 file. A few bad bytes are replaced by U+FFFD (and counted); a file where
    most lines are not UTF-8 is in another encoding (or not text), and is refused: training on
    U+FFFD sequences would look like success."""
    invalid = text_lines = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("utf-8", errors="replace")
                stats.invalid_utf8_lines[path] = stats.invalid_utf8_lines.get(path, 0) + 1
                invalid += 1
            text_lines += bool(raw.strip())
            yield number, line.rstrip("\r\n")
    if invalid and invalid * 2 > text_lines:
        raise UsageError(f"{path}: {invalid} of its {text_lines} lines are not UTF-8: it is in another "
                         "encoding or not text; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _text_documents(path: str, mode: str, stats: ReadStats) -> Iterator[str]:
    if mode == "lines":
        for _, line in _text_lines(path, stats):
            if line.strip():
                yield line
        return
    lines: list[str] = []
    size = 0
    for _, line in _text_lines(path, stats):
        if line.strip():
            lines.append(line)
            size += len(line) + 1
            if size < MAX_DOCUMENT_CHARS:
                continue
        if lines:
            yield "\n".join(lines)
            lines, size = [], 0
    if lines:
        yield "\n".join(lines)


def _jsonl_documents(path: str, text_field: str, stats: ReadStats) -> Iterator[str]:
    for number, line in _text_lines(path, stats):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict) or text_field not in record:
            fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise UsageError(f"{path}:{number}: no field {text_field!r} (found: {fields}); "
                             "choose the field with --text-field")
        text = record[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise UsageError(f"{path}:{number}: field {text_field!r} holds {type(text).__name__}, not text")
        if text.strip():
            yield text


def _column_documents(rows, where: str, text_field: str) -> Iterator[str]:
    names = rows.column_names
    if names is not None and text_field not in names:
        raise UsageError(f"{where}: no column {text_field!r} (found: {', '.join(names)}); "
                         "choose it with --text-field")
    for row in rows:
        text = row.get(text_field)
        if isinstance(text, str) and text.strip():
            yield text


def _check_text_type(where: str, text_field: str, arrow_type) -> None:
    """A column of numbers (or anything but strings) would otherwise read as "holds no text"."""
    import pyarrow as pa

    if not (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)):
        raise UsageError(f"{where}: column {text_field!r} holds {arrow_type}, not text; choose a text column "
                         "with --text-field")


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    # datasets' parquet builder would copy the file into its cache first; pyarrow streams it directly,
    # one row group at a time, in the same order.
    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises several types for a file that is not parquet
        raise UsageError(f"{path}: not a readable parquet file: {error}") from None
    if text_field not in parquet.schema_arrow.names:
        raise UsageError(f"{path}: no column {text_field!r} (found: {', '.join(parquet.schema_arrow.names)}); "
                         "choose it with --text-field")
    _check_text_type(path, text_field, parquet.schema_arrow.field(text_field).type)
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def _saved_documents(path: str, text_field: str) -> Iterator[str]:
    import datasets

    loaded = datasets.load_from_disk(path)  # memory-mapped Arrow: nothing is read until iterated
    splits = [loaded[name] for name in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for split in splits:
        if text_field not in split.column_names:
            raise UsageError(f"{path}: no column {text_field!r} (found: {', '.join(split.column_names)}); "
                             "choose it with --text-field")
        _check_text_type(path, text_field, split.data.schema.field(text_field).type)
        for batch in split.select_columns([text_field]).iter(batch_size=1024):
            for text in batch[text_field]:
                if isinstance(text, str) and text.strip():
                    yield text


def _hub_documents(source: Source, text_field: str) -> Iterator[str]:
    import datasets

    try:
        rows = datasets.load_dataset(source.location, source.config or None, split="train", streaming=True)
    except Exception as error:  # no network, unknown name, ...: all reported the same way
        raise UsageError(f"--input hf:{source.location}: cannot open the hub dataset: {error}") from None
    yield from _column_documents(rows, f"hf:{source.location}", text_field)


def check_readable(sources: list[Source], text_field: str) -> None:
    """Cheap checks before anything is written: columns exist, saved datasets open."""
    for source in sources:
        if source.kind == "parquet":
            next(iter(_parquet_documents(source.location, text_field)), None)
        elif source.kind == "saved":
            next(iter(_saved_documents(source.location, text_field)), None)


def iter_documents(sources: list[Source], text_field: str = "text", text_mode: str = "blank-lines",
                   stats: ReadStats | None = None, builtin_max_documents: int = 0) -> Iterator[str]:
    """Every document of every source, in order."""
    from hvdbert.data.corpus import builtin_documents

    stats = stats if stats is not None else ReadStats()
    for source in sources:
        if source.kind == "builtin":
            documents = builtin_documents(builtin_max_documents)
        elif source.kind == "text":
            documents = _text_documents(source.location, text_mode, stats)
        elif source.kind == "jsonl":
            documents = _jsonl_documents(source.location, text_field, stats)
        elif source.kind == "parquet":
            documents = _parquet_documents(source.location, text_field)
        elif source.kind == "saved":
            documents = _saved_documents(source.location, text_field)
        else:
            documents = _hub_documents(source, text_field)
        for document in documents:
            stats.documents += 1
            yield document
