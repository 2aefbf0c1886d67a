"""The held-out split: which documents of a corpus are kept out of training.

A document is held out when a hash of its text falls below `fraction` of the hash range. The
decision depends on the document alone (not on its position, nor on which worker reads it), so the
split is the same for any number of preparing processes, and copies of one document always land on
the same side: a duplicated document cannot leak from training into the held-out set. The held-out
share is `fraction` on average (each document is an independent draw), never a cut through one.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Iterator

VALIDATION_DIR = "validation"  # DATA_DIR/validation/: the held-out documents, prepared alike
_HASH_RANGE = 1 << 64


def is_held_out(document: str, fraction: float) -> bool:
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(document.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * _HASH_RANGE


class SplitDocuments:
    """The documents of one side of the split (`held_out` or not), counted as they pass."""

    def __init__(self, documents: Iterable[str], fraction: float, held_out: bool):
        self.documents = documents
        self.fraction = fraction
        self.held_out = held_out
        self.count = 0

    def __iter__(self) -> Iterator[str]:
        for document in self.documents:
            if is_held_out(document, self.fraction) == self.held_out:
                self.count += 1
                yield document
