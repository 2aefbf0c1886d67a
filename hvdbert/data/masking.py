"""Dynamic masked-language-model masking, deterministic in (seed, epoch, sample index).

Devlin et al. 2018: choose 15% of the non-special tokens (at most max_predictions_per_seq, at
least one); replace 80% of the chosen by [MASK], 10% by a random token, keep 10%. The random
numbers come from a counter-based hash of (seed, epoch, sample, position, stream), not from a
stateful generator, so a sample gets the same mask whichever worker reads it, in whatever order,
and a resumed run sees exactly the masks an uninterrupted run would.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = -100  # label value the loss skips
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (Steele et al. 2014, SplitMix64's finaliser); wraps modulo 2**64."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, epoch: int, samples: np.ndarray, width: int, stream: int) -> np.ndarray:
    """Uniform [0, 1) floats of shape (len(samples), width), a pure function of the arguments."""
    with np.errstate(over="ignore"):
        key = splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) ^ np.uint64(epoch))
        key = splitmix64(key ^ np.uint64(stream) * _GOLDEN)
        rows = splitmix64(key ^ np.asarray(samples, dtype=np.uint64))
        bits = splitmix64(rows[:, None] + np.arange(width, dtype=np.uint64)[None, :] * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class MaskingRule:
    mask_prob: float
    max_predictions: int
    mask_id: int
    vocab_size: int  # random replacements are drawn from [0, vocab_size)
    special_ids: tuple[int, ...]  # never masked: [CLS], [SEP], [PAD]
    # Whole-word masking (Google's BERT release of 2019-05-31; Cui et al. 2019 for Chinese): the
    # pieces of a word are chosen together, and counted together against max_predictions.
    whole_word: bool = False


def mask_tokens(input_ids: np.ndarray, samples: np.ndarray, epoch: int, seed: int,
                rule: MaskingRule, candidates: np.ndarray | None = None,
                word_starts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mask a batch. Returns the masked input_ids plus masked_positions and masked_labels of shape
    (batch, max_predictions), padded with position 0 and label IGNORE_INDEX.

    `candidates` (bool, like input_ids) restricts which positions may be chosen; by default every
    non-special token is a candidate. With rule.whole_word, `word_starts` (bool, like input_ids)
    marks the first piece of every word; a word is masked whole or not at all.
    """
    batch, width = input_ids.shape
    if candidates is None:
        candidates = ~np.isin(input_ids, rule.special_ids)
    if rule.whole_word:
        if word_starts is None:
            raise ValueError("whole-word masking needs word_starts")
        positions, valid = _choose_whole_words(candidates, np.asarray(word_starts, dtype=bool), samples,
                                               epoch, seed, rule)
        return _replace(input_ids, positions, valid, samples, epoch, seed, rule)
    n_candidates = candidates.sum(axis=1)
    n_masked = np.minimum(rule.max_predictions,
                          np.maximum(1, np.rint(n_candidates * rule.mask_prob).astype(np.int64)))
    n_masked = np.minimum(n_masked, n_candidates)

    # A random order of each row's candidates: the n_masked first are masked.
    scores = np.where(candidates, uniform(seed, epoch, samples, width, stream=0), 2.0)
    order = np.argsort(scores, axis=1, kind="stable")[:, : rule.max_predictions]
    valid = np.arange(rule.max_predictions)[None, :] < n_masked[:, None]
    # valid is a prefix of each row; sorting keeps it one (padding sorts last as `width`)
    positions = np.where(valid, np.sort(np.where(valid, order, width), axis=1), 0)
    return _replace(input_ids, positions, valid, samples, epoch, seed, rule)


def _choose_whole_words(candidates: np.ndarray, word_starts: np.ndarray, samples: np.ndarray, epoch: int,
                        seed: int, rule: MaskingRule) -> tuple[np.ndarray, np.ndarray]:
    """Positions to mask, whole words at a time: words in a random order, each taken if it still
    fits the row's budget of round(15% of candidates) (at most max_predictions), else skipped, as in
    BERT's create_pretraining_data.py. Returns positions (sorted, padded with 0) and validity."""
    batch, width = candidates.shape
    scores = uniform(seed, epoch, samples, width, stream=0)
    positions = np.zeros((batch, rule.max_predictions), dtype=np.int64)
    valid = np.zeros((batch, rule.max_predictions), dtype=bool)
    for row in range(batch):
        candidate = candidates[row]
        n_candidates = int(candidate.sum())
        if n_candidates == 0:
            continue
        budget = min(rule.max_predictions, n_candidates, max(1, int(np.rint(n_candidates * rule.mask_prob))))
        index = np.flatnonzero(candidate)
        # a candidate opens a new word where the data says so, or where the previous candidate is
        # not its neighbour (special tokens between them end any word)
        opens = word_starts[row, index] | np.r_[True, np.diff(index) != 1]
        word_of = np.cumsum(opens) - 1
        word_first = np.flatnonzero(opens)
        word_length = np.diff(np.r_[word_first, len(index)])
        chosen = []
        count = 0
        for word in np.argsort(scores[row, index[word_first]], kind="stable"):
            if count + word_length[word] > budget:
                continue
            chosen.append(index[word_of == word])
            count += word_length[word]
            if count == budget:
                break
        if chosen:
            picked = np.sort(np.concatenate(chosen))
            positions[row, :len(picked)] = picked
            valid[row, :len(picked)] = True
    return positions, valid


def _replace(input_ids: np.ndarray, positions: np.ndarray, valid: np.ndarray, samples: np.ndarray, epoch: int,
             seed: int, rule: MaskingRule) -> dict[str, np.ndarray]:
    """80% [MASK], 10% random token, 10% unchanged (Devlin et al. 2018), chosen per position."""
    batch = input_ids.shape[0]
    rows = np.arange(batch)[:, None]
    labels = np.where(valid, input_ids[rows, positions], IGNORE_INDEX)
    action = uniform(seed, epoch, samples, rule.max_predictions, stream=1)
    random_tokens = (uniform(seed, epoch, samples, rule.max_predictions, stream=2) * rule.vocab_size).astype(np.int64)
    replacement = np.where(action < 0.8, rule.mask_id, np.where(action < 0.9, random_tokens, labels))
    masked = input_ids.copy()
    r, c = np.nonzero(valid)
    masked[r, positions[r, c]] = replacement[r, c]
    return {"input_ids": masked, "masked_positions": positions, "masked_labels": labels}
