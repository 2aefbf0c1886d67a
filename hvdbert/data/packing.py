"""Turn tokenized documents into fixed-length training sequences."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np


class MlmPacker:
    """RoBERTa-style packing (Liu et al. 2019, "FULL-SENTENCES"): documents are concatenated with
    [SEP] between them and cut into sequences of exactly seq_len tokens, [CLS] ... [SEP], so no
    position is padding. The tail shorter than one sequence is dropped (counted in `dropped_tokens`).
    """

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, dtype: np.dtype):
        self.body = seq_len - 2  # room between [CLS] and the final [SEP]
        self.cls_id, self.sep_id = cls_id, sep_id
        self.dtype = dtype
        self._carry = np.empty(0, dtype=dtype)
        self.dropped_tokens = 0

    def add(self, documents: Iterable[list[int]]) -> np.ndarray:
        """Pack a batch of tokenized documents; returns the complete sequences, shape (n, seq_len)."""
        pieces = [self._carry]
        for ids in documents:
            if ids:
                if len(pieces) > 1 or len(self._carry):
                    pieces.append(np.array([self.sep_id], dtype=self.dtype))  # document boundary
                pieces.append(np.asarray(ids, dtype=self.dtype))
        stream = np.concatenate(pieces)
        n = len(stream) // self.body
        self._carry = stream[n * self.body:]
        body = stream[: n * self.body].reshape(n, self.body)
        out = np.empty((n, self.body + 2), dtype=self.dtype)
        out[:, 0] = self.cls_id
        out[:, 1:-1] = body
        out[:, -1] = self.sep_id
        return out

    def finish(self) -> np.ndarray:
        self.dropped_tokens += len(self._carry)
        self._carry = self._carry[:0]
        return np.empty((0, self.body + 2), dtype=self.dtype)


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
