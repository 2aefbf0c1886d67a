"""Run assembly: what one training run is made of, built once, the same way for pretrain and bench.

`build_run()` turns a recipe, a data directory and the distributed layer into a `Run`: the device,
the prepared data, the plan for this worker count, the model and its training forward, the optimizer
(wrapped by the distributed layer), the precision and the progress counters. `pretrain`, the elastic
loop, `Checkpointer` and the benchmark all take the `Run`; none assembles these pieces itself.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hvdbert import families
from hvdbert.compression import build_compressor
from hvdbert.config import Recipe
from hvdbert.data.loader import BatchStream, StreamLayout
from hvdbert.data.masking import MaskingRule
from hvdbert.data.shards import PreparedData
from hvdbert.dist import Distributed
from hvdbert.errors import UsageError
from hvdbert.model import PretrainingForward, build_model, compile_model
from hvdbert.optim import build_optimizer, init_state
from hvdbert.plan import Plan, make_plan
from hvdbert.preflight import check_data
from hvdbert.prepare import builtin_cache_dir, prepare_builtin
from hvdbert.state import Precision, TrainState

log = logging.getLogger("hvdbert")


def cache_root() -> Path:
    return Path(os.environ.get("HVDBERT_CACHE", Path.home() / ".cache" / "hvdbert"))


def choose_device(dist: Distributed, precision: str) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if not Precision.supported(precision, "cpu"):
        raise UsageError(f"train.precision = {precision} needs a CUDA GPU, or a torch whose CPU autocast "
                         f"supports it (this is torch {torch.__version__}); use train.precision = fp32")
    return torch.device("cpu")


def open_data(data_dir: Path | None, recipe: Recipe, dist: Distributed) -> PreparedData:
    """The prepared data `data_dir`, or the embedded corpus (prepared once per host), checked
    against the recipe: sequence length, format, vocabulary and the tokenizer's fingerprint."""
    vocab_size = recipe.model_field("vocab_size")
    if data_dir is None:
        directory = builtin_cache_dir(cache_root() / "data", vocab_size, recipe.data.max_seq_len,
                                      recipe.data.builtin_max_documents)
        if dist.elastic:
            # A worker that joins a running elastic job meets the others only at the state's sync, so
            # no barrier here: each worker calls the preparation, which one at a time per host (a
            # file lock) prepares the corpus or finds it prepared.
            prepare_builtin(directory, vocab_size, recipe.data.max_seq_len, recipe.data.builtin_max_documents)
        else:
            if dist.local_rank == 0:  # one preparer per host; the others wait for it
                prepare_builtin(directory, vocab_size, recipe.data.max_seq_len, recipe.data.builtin_max_documents)
            dist.barrier(bounded=False)  # preparing may take minutes: not a stall
        data_dir = directory
    data = PreparedData(data_dir)
    check_data(data, recipe)
    return data


@dataclass
class Run:
    """What one training run is made of. `plan` changes only when an elastic job changes its worker
    count; `stream` is (re)opened at `state.samples_seen` by `open_stream()`."""

    recipe: Recipe
    dist: Distributed
    device: torch.device
    data: PreparedData
    plan: Plan
    model: torch.nn.Module  # BertForPreTraining | ModernBertForMaskedLM: what checkpoints and export hold
    forward: torch.nn.Module  # the training forward over `model`, as the distributed layer wraps it
    optimizer: torch.optim.Optimizer
    precision: Precision
    state: TrainState
    stream: BatchStream | None = None
    # dist.compression's own state (compression.PowerSGD: error buffers, factors), or None
    compressor: object | None = None

    def open_stream(self) -> BatchStream:
        """This worker's batches from the global sample position `state.samples_seen` on."""
        self.close_stream()
        recipe, special = self.recipe, self.data.manifest.special_token_ids
        rule = MaskingRule(
            mask_prob=recipe.data.mask_prob, max_predictions=recipe.data.max_predictions_per_seq,
            mask_id=special["mask"], vocab_size=self.data.manifest.vocab_size,
            special_ids=(special["pad"], special["cls"], special["sep"]),
            whole_word=recipe.data.whole_word_masking,
        )
        layout = StreamLayout(self.dist.size, self.dist.rank, self.plan.micro_batch_size,
                              self.plan.accumulation_steps)
        self.data.share_verification(self.dist.rank, self.dist.size)  # each shard's sha256 is checked by one rank
        self.stream = BatchStream(self.data, layout, rule, recipe.train.seed, self.state.samples_seen,
                                  recipe.data.prefetch_batches, pin_memory=self.device.type == "cuda")
        return self.stream

    def close_stream(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def broadcast_from_rank0(self) -> None:
        """Every rank takes rank 0's model, optimizer, scaler and progress (a random initialisation or
        a checkpoint that only rank 0 read)."""
        dist = self.dist
        self.state.load_state_dict(dist.broadcast_object(self.state.state_dict(), name="train_state"))
        dist.broadcast_model_and_optimizer(self.model, self.optimizer)
        if self.precision.scaler is not None:
            self.precision.scaler.load_state_dict(dist.broadcast_object(self.precision.scaler.state_dict(),
                                                                        name="scaler"))
        if self.compressor is not None and self.compressor.stateful:
            # Rank 0 read the checkpoint (restore_training kept its compression state aside); each
            # worker takes its own part of it.
            restored, saved = dist.broadcast_object(self.compressor.restored, name="compression_state")
            if restored:
                note = self.compressor.load_state(saved, dist.rank, dist.size)
                if note is not None and dist.rank == 0:
                    log.warning("hvdbert: %s", note)
            self.compressor.restored = (False, None)

    def replan(self) -> Plan:
        """After an elastic resize: the plan (accumulation, LR) for the new worker count."""
        self.plan = make_plan(self.recipe, self.dist.size)
        self.dist.set_accumulation_steps(self.optimizer, self.plan.accumulation_steps)
        return self.plan


def build_run(recipe: Recipe, data_dir: Path | None, dist: Distributed) -> Run:
    """Device, data, plan, model, optimizer and precision for `recipe` on this worker. The model is
    initialised from train.seed; rank 0's state is broadcast later (after a possible restore)."""
    plan = make_plan(recipe, dist.size)
    device = choose_device(dist, recipe.train.precision)
    if device.type == "cpu":
        torch.set_num_threads(recipe.dist.threads_per_worker)  # one rank per core by default
    data = open_data(data_dir, recipe, dist)
    torch.manual_seed(recipe.train.seed)
    # ModernBERT's token ids come from this run's tokenizer (families.with_token_ids); the resolved
    # recipe, checkpoints and export then name them.
    recipe.model = families.with_token_ids(recipe.model, data.manifest.special_token_ids)
    model = build_model(recipe.model, with_nsp=data.has_nsp, device_type=device.type).to(device)
    if recipe.train.compile:
        compile_model(model)
    wire = recipe.dist.wire_compression
    # Every worker draws PowerSGD's first factors from the same seed: they must start equal.
    compressor = build_compressor(wire, model.parameters(), recipe.dist.powersgd_rank,
                                  recipe.dist.powersgd_start_step, recipe.train.seed)
    optimizer = dist.wrap_optimizer(build_optimizer(model, recipe.optim, plan), model,
                                    plan.accumulation_steps, wire == "fp16", compressor, recipe.dist.bucket_mb)
    init_state(optimizer, recipe.optim.name)  # Horovod's wrapper is a new optimizer object: create its state here
    return Run(recipe=recipe, dist=dist, device=device, data=data, plan=plan, model=model,
               forward=dist.wrap_forward(PretrainingForward(model)), optimizer=optimizer,
               precision=Precision.create(recipe.train.precision, device), state=TrainState(),
               compressor=compressor)
