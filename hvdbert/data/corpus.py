"""The embedded default corpus: English text that every Python installation carries.

Documents are the `pydoc_data` help topics and the docstrings of the standard library's modules,
classes and functions, read with `ast` (no module is imported). Several megabytes of technical
English: enough for a small BERT to learn visibly, with no download.
"""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path
from typing import Iterator

MIN_DOCUMENT_CHARS = 200  # shorter docstrings are mostly signatures and one-liners


def _stdlib_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in stdlib.rglob("*.py") if not skip.intersection(p.relative_to(stdlib).parts))


def docstrings(path: Path, min_chars: int = MIN_DOCUMENT_CHARS) -> Iterator[str]:
    """The docstrings of a Python file's module, classes and functions of at least `min_chars`
    characters (read with `ast`, nothing imported); none for a file that does not parse."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                yield doc


def builtin_documents(max_documents: int = 0) -> Iterator[str]:
    """Yield the embedded corpus, one document at a time, in a fixed order (0 = no limit)."""
    from pydoc_data.topics import topics

    count = 0
    for name in sorted(topics):
        yield topics[name]
        count += 1
        if count == max_documents:
            return
    for path in _stdlib_files():
        for doc in docstrings(path):
            yield doc
            count += 1
            if count == max_documents:
                return
