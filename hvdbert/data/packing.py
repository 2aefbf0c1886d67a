"""Turn tokenized documents into fixed-length training sequences: `mlm` packing and `nsp` pairs.

Both work on one shard's documents at a time (see hvdbert.prepare: a shard is a fixed block of
documents), so what they produce depends only on that block, never on which worker prepared it.
Word starts (for whole-word masking) travel alongside the token ids when the input came with its
own word segmentation.
"""
from __future__ import annotations

import re
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
        self._carry_starts = np.empty(0, dtype=np.uint8)
        self.dropped_tokens = 0

    def add(self, documents: Iterable[list[int] | np.ndarray],
            word_starts: Iterable[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Pack a batch of tokenized documents. Returns the complete sequences, shape (n, seq_len),
        and their word-start flags (same shape) when `word_starts` was given, else None."""
        documents = list(documents)
        starts_in = list(word_starts) if word_starts is not None else None
        pieces, start_pieces = [self._carry], [self._carry_starts]
        boundary = np.array([self.sep_id], dtype=self.dtype)
        for index, ids in enumerate(documents):
            if len(ids):
                if len(pieces) > 1 or len(self._carry):
                    pieces.append(boundary)  # document boundary
                    start_pieces.append(np.ones(1, dtype=np.uint8))
                pieces.append(np.asarray(ids, dtype=self.dtype))
                if starts_in is not None:
                    start_pieces.append(np.asarray(starts_in[index], dtype=np.uint8))
        stream = np.concatenate(pieces)
        n = len(stream) // self.body
        self._carry = stream[n * self.body:]
        out = np.empty((n, self.body + 2), dtype=self.dtype)
        out[:, 0] = self.cls_id
        out[:, 1:-1] = stream[: n * self.body].reshape(n, self.body)
        out[:, -1] = self.sep_id
        if starts_in is None:
            return out, None
        starts = np.concatenate(start_pieces)
        self._carry_starts = starts[n * self.body:]
        out_starts = np.ones((n, self.body + 2), dtype=np.uint8)
        out_starts[:, 1:-1] = starts[: n * self.body].reshape(n, self.body)
        return out, out_starts

    def finish(self) -> None:
        """End of a shard: the incomplete tail is dropped and packing starts afresh."""
        self.dropped_tokens += len(self._carry)
        self._carry = self._carry[:0]
        self._carry_starts = self._carry_starts[:0]


# Sentence ends: Western punctuation followed by space, or CJK full stops (no space follows them).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？；])")


def split_sentences(document: str) -> list[str]:
    """Segments for next-sentence pairs: lines, further cut after sentence-ending punctuation."""
    sentences = []
    for line in document.splitlines():
        sentences.extend(s for s in _SENTENCE_END.split(line) if s.strip())
    return sentences


def _concat(segments: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(segments, axis=1) if segments else np.empty((2, 0), dtype=np.int64)


def _truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int, rng: np.random.Generator):
    """Trim the longer segment, one token at a time from a random end (Devlin et al. 2018's
    create_pretraining_data.truncate_seq_pair), until the pair fits."""
    a_start, a_end, b_start, b_end = 0, a.shape[1], 0, b.shape[1]
    while (a_end - a_start) + (b_end - b_start) > max_tokens:
        if a_end - a_start > b_end - b_start:
            if rng.random() < 0.5:
                a_start += 1
            else:
                a_end -= 1
        elif rng.random() < 0.5:
            b_start += 1
        else:
            b_end -= 1
    return a[:, a_start:a_end], b[:, b_start:b_end]


def nsp_pairs(documents: list[list[np.ndarray]], seq_len: int, rng: np.random.Generator, cls_id: int,
              sep_id: int, pad_id: int, short_seq_prob: float = 0.1) -> dict[str, np.ndarray]:
    """Original BERT sentence pairs (Devlin et al. 2018, create_pretraining_data.py), one pass
    (dupe_factor 1: masks are drawn afresh every epoch at load time instead).

    `documents`: per document, its sentences as arrays of shape (2, n): token ids and word starts.
    Each pair is [CLS] A [SEP] B [SEP]: A is one or more consecutive sentences; B continues A
    (label 0) or, with probability 0.5, is taken from another document of the same shard
    (label 1). With probability `short_seq_prob` the target length is shorter, so the model also
    sees short inputs. Pairs are padded to seq_len only where they fall short.
    Returns input_ids, token_type_ids, word_start (n, seq_len) and next_sentence_label (n,).
    """
    max_tokens = seq_len - 3  # [CLS], [SEP], [SEP]
    ids_rows, type_rows, start_rows, labels = [], [], [], []
    for doc_index, document in enumerate(documents):
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = int(rng.integers(2, max_tokens + 1))
        chunk: list[np.ndarray] = []
        length, i = 0, 0
        while i < len(document):
            chunk.append(document[i])
            length += document[i].shape[1]
            if i == len(document) - 1 or length >= target:
                a_end = 1 if len(chunk) < 2 else int(rng.integers(1, len(chunk)))
                tokens_a = _concat(chunk[:a_end])
                if len(chunk) == 1 or rng.random() < 0.5:
                    is_random_next = 1
                    target_b = max(1, target - tokens_a.shape[1])
                    other = doc_index
                    for _ in range(10):  # as in BERT: try for a different document
                        other = int(rng.integers(0, len(documents)))
                        if other != doc_index:
                            break
                    random_doc = documents[other]
                    start = int(rng.integers(0, len(random_doc)))
                    b_segments, b_length = [], 0
                    for segment in random_doc[start:]:
                        b_segments.append(segment)
                        b_length += segment.shape[1]
                        if b_length >= target_b:
                            break
                    tokens_b = _concat(b_segments)
                    i -= len(chunk) - a_end  # the unused sentences are read again
                else:
                    is_random_next = 0
                    tokens_b = _concat(chunk[a_end:])
                tokens_a, tokens_b = _truncate_pair(tokens_a, tokens_b, max_tokens, rng)
                if tokens_a.shape[1] >= 1 and tokens_b.shape[1] >= 1:
                    n_a, n_b = tokens_a.shape[1], tokens_b.shape[1]
                    ids = np.full(seq_len, pad_id, dtype=np.int64)
                    ids[0], ids[1 + n_a], ids[2 + n_a + n_b] = cls_id, sep_id, sep_id
                    ids[1:1 + n_a], ids[2 + n_a:2 + n_a + n_b] = tokens_a[0], tokens_b[0]
                    types = np.zeros(seq_len, dtype=np.uint8)
                    types[2 + n_a:3 + n_a + n_b] = 1
                    starts = np.ones(seq_len, dtype=np.uint8)
                    starts[1:1 + n_a], starts[2 + n_a:2 + n_a + n_b] = tokens_a[1], tokens_b[1]
                    ids_rows.append(ids)
                    type_rows.append(types)
                    start_rows.append(starts)
                    labels.append(is_random_next)
                chunk, length = [], 0
            i += 1
    if not ids_rows:
        empty = np.empty((0, seq_len), dtype=np.int64)
        return {"input_ids": empty, "token_type_ids": empty.astype(np.uint8),
                "word_start": empty.astype(np.uint8), "next_sentence_label": np.empty(0, dtype=np.int8)}
    return {"input_ids": np.stack(ids_rows), "token_type_ids": np.stack(type_rows),
            "word_start": np.stack(start_rows), "next_sentence_label": np.array(labels, dtype=np.int8)}


def batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
