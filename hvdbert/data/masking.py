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


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A 64-bit mixing function (Steele et al. 2014, SplitMix64's finaliser); wraps modulo 2**64."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, epoch: int, samples: np.ndarray, width: int, stream: int) -> np.ndarray:
    """Uniform [0, 1) floats of shape (len(samples), width), a pure function of the arguments."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(0x100000001B3) ^ np.uint64(epoch))
        key = _splitmix64(key ^ np.uint64(stream) * _GOLDEN)
        rows = _splitmix64(key ^ np.asarray(samples, dtype=np.uint64))
        bits = _splitmix64(rows[:, None] + np.arange(width, dtype=np.uint64)[None, :] * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class MaskingRule:
    mask_prob: float
    max_predictions: int
    mask_id: int
    vocab_size: int  # random replacements are drawn from [0, vocab_size)
    special_ids: tuple[int, ...]  # never masked: [CLS], [SEP], [PAD]


def mask_tokens(input_ids: np.ndarray, samples: np.ndarray, epoch: int, seed: int,
                rule: MaskingRule, candidates: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mask a batch. Returns the masked input_ids plus masked_positions and masked_labels of shape
    (batch, max_predictions), padded with position 0 and label IGNORE_INDEX.

    `candidates` (bool, like input_ids) restricts which positions may be chosen; by default every
    non-special token is a candidate.
    """
    batch, width = input_ids.shape
    if candidates is None:
        candidates = ~np.isin(input_ids, rule.special_ids)
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

    rows = np.arange(batch)[:, None]
    labels = np.where(valid, input_ids[rows, positions], IGNORE_INDEX)
    action = uniform(seed, epoch, samples, rule.max_predictions, stream=1)
    random_tokens = (uniform(seed, epoch, samples, rule.max_predictions, stream=2) * rule.vocab_size).astype(np.int64)
    replacement = np.where(action < 0.8, rule.mask_id, np.where(action < 0.9, random_tokens, labels))
    masked = input_ids.copy()
    r, c = np.nonzero(valid)
    masked[r, positions[r, c]] = replacement[r, c]
    return {"input_ids": masked, "masked_positions": positions, "masked_labels": labels}
