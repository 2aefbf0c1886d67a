"""The training data stream: which samples each worker reads at each step, masked, prefetched.

Positions are counted in global sample units; a step starts at `samples_seen`, the run's position.
Position p belongs to epoch p // N (N sequences) and reads sample permute(p % N): a pseudo-random permutation per epoch that
needs no memory and no scan, so a run resumes at any position at once. In an optimizer step that
starts at position s = samples_seen, worker r's micro-batch a covers positions
    s + (a x workers + r) x micro  ...  + micro
so every position is read exactly once, and one worker with k micro-batches reads what k workers
with one micro-batch each would read: the split does not change the data of a step.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
import numpy as np
import torch

from hvdbert.data.masking import MaskingRule, splitmix64, mask_tokens
from hvdbert.data.shards import PreparedData

_FEISTEL_ROUNDS = 4


def permute(positions: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """A bijection of [0, n) chosen by (seed, epoch): a balanced Feistel network on the smallest
    even-bit domain covering n, with cycle walking to stay inside [0, n) (Black & Rogaway 2002)."""
    positions = np.asarray(positions, dtype=np.uint64)
    if n <= 1:
        return positions.astype(np.int64)
    half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    with np.errstate(over="ignore"):
        keys = [splitmix64(np.uint64(seed) * np.uint64(1_000_003) ^ np.uint64(epoch) << np.uint64(8)
                            ^ np.uint64(r)) for r in range(_FEISTEL_ROUNDS)]

        def encrypt(x: np.ndarray) -> np.ndarray:
            left, right = x >> shift, x & mask
            for key in keys:
                left, right = right, left ^ (splitmix64(right ^ key) & mask)
            return (left << shift) | right

        out = encrypt(positions)
        outside = out >= np.uint64(n)
        while outside.any():  # cycle walking: expected under 4 rounds, the domain is < 4n
            out[outside] = encrypt(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)


@dataclass(frozen=True)
class StreamLayout:
    workers: int
    rank: int
    micro_batch_size: int
    accumulation_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.workers * self.micro_batch_size * self.accumulation_steps

    def positions(self, samples_seen: int, micro_step: int) -> np.ndarray:
        """This worker's positions in micro-batch `micro_step` of the step that starts at `samples_seen`."""
        first = samples_seen + (micro_step * self.workers + self.rank) * self.micro_batch_size
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)


class BatchStream:
    """Micro-batches for one worker from a global position on, prepared by a background thread."""

    def __init__(self, data: PreparedData, layout: StreamLayout, rule: MaskingRule, seed: int,
                 samples_seen: int, prefetch_batches: int, pin_memory: bool = False):
        self.data = data
        self.layout = layout
        self.rule = rule
        self.seed = seed
        self.pin_memory = pin_memory
        # Whole-word masking without the input's own segmentation: words are WordPiece words.
        self._continuation = (data.continuation_table() if rule.whole_word and not data.has_word_starts
                              else None)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch_batches))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(samples_seen,), daemon=True,
                                        name="hvdbert-data")
        self._thread.start()

    def batch_at(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        n = len(self.data)
        epochs = positions // n
        samples = np.empty_like(positions)
        for epoch in np.unique(epochs):
            rows = epochs == epoch
            samples[rows] = permute(positions[rows] % n, n, self.seed, int(epoch))
        rows = self.data.get(samples)
        word_starts = rows.pop("word_start", None)
        if self.rule.whole_word and word_starts is None:
            word_starts = ~self._continuation[rows["input_ids"]]
        if self.data.has_nsp:
            # Sentence pairs are padded at the end where they fall short; the model must not attend there.
            rows["attention_mask"] = (rows["input_ids"] != self.data.manifest.special_token_ids["pad"]).astype(np.int64)
        masked = {}
        for epoch in np.unique(epochs):  # masks depend on the epoch: a fresh mask every epoch
            part = epochs == epoch
            for name, value in mask_tokens(rows["input_ids"][part], samples[part], int(epoch), self.seed,
                                           self.rule, word_starts=None if word_starts is None
                                           else word_starts[part]).items():
                masked.setdefault(name, np.empty((len(positions), *value.shape[1:]), dtype=np.int64))
                masked[name][part] = value
        batch = {**rows, **masked, "sample_ids": samples}
        tensors = {name: torch.from_numpy(value) for name, value in batch.items()}
        if self.pin_memory:
            tensors = {name: t.pin_memory() for name, t in tensors.items()}
        return tensors

    def _produce(self, samples_seen: int) -> None:
        layout = self.layout
        try:
            while not self._stop.is_set():
                for micro_step in range(layout.accumulation_steps):
                    batch = self.batch_at(layout.positions(samples_seen, micro_step))
                    while not self._stop.is_set():
                        try:
                            self._queue.put(batch, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                samples_seen += layout.global_batch_size  # as TrainState.advance
        except BaseException as error:  # surfaced in the training thread by next_step()
            self._queue.put(error)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The accumulation_steps micro-batches of this worker's next optimizer step."""
        batches = []
        for _ in range(self.layout.accumulation_steps):
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            batches.append(item)
        return batches

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
