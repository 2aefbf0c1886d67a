"""The model: transformers' BertForPreTraining or ModernBertForMaskedLM (model.architecture),
randomly initialised from the recipe.

The training forward pass runs the encoder and then the MLM head only at the masked positions
(gather first): at 15% (BERT) or 30% (ModernBERT) masking this skips most of the vocabulary
projection, the largest single matrix multiply in the head. The module's weights are exactly the
transformers class's, so export is `save_pretrained`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from hvdbert import families
from hvdbert.data.masking import IGNORE_INDEX


def build_model(model_fields: dict, with_nsp: bool, device_type: str = "cpu") -> torch.nn.Module:
    config = families.build_config(model_fields)
    model_class = families.model_class(model_fields)
    model = model_class._from_config(config, attn_implementation=families.attention_implementation(device_type))
    families.family_of(model_fields).hooks.prepare_for_training(model, with_nsp)
    return model


def compile_model(model: torch.nn.Module) -> None:
    """train.compile: torch.compile the encoder and the MLM head, the modules of every step's
    forward and backward. In place (nn.Module.compile), so the parameter names, and with them
    checkpoints, export and Horovod's allreduce names, stay those of the eager model. The first
    step pays the compilation; batches have one shape per run, so nothing recompiles."""
    for module in families.family_of_model(model).hooks.compiled_modules(model):
        module.compile()


@dataclass
class StepOutput:
    loss: torch.Tensor  # what backward() sees: MLM (+ NSP) loss
    mlm_loss: torch.Tensor
    mlm_correct: torch.Tensor  # correctly predicted masked tokens (a count)
    mlm_count: torch.Tensor  # masked tokens
    nsp_loss: torch.Tensor | None
    nsp_correct: torch.Tensor | None = None  # correctly predicted next-sentence labels (a count)


def _tokens(out: StepOutput, batch: dict[str, torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    # real tokens: packed MLM sequences have no padding; padded formats carry a mask
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return zero.new_tensor(float(batch["input_ids"].numel()))


def _or_zero(value: torch.Tensor | None, zero: torch.Tensor) -> torch.Tensor:
    return value if value is not None else zero


# What one forward pass over a micro-batch adds to the sums that training logs (train.log_window) and
# evaluation reports (evaluate.evaluate): the one place a statistic is named. Each rank sums them in
# float64 and the ranks reduce them in one allreduce, only when the figures are read; the records
# then read them by name. Per entry: name -> f(output, batch, a float64 zero on the device).
MICRO_BATCH_STATS: dict[str, Callable[[StepOutput, dict, torch.Tensor], torch.Tensor]] = {
    "loss": lambda out, batch, zero: out.loss.detach(),  # what backward saw: MLM (+ NSP), a micro-batch mean
    "mlm_loss": lambda out, batch, zero: out.mlm_loss.detach(),  # a micro-batch mean
    "nsp_loss": lambda out, batch, zero: _or_zero(out.nsp_loss, zero).detach(),  # a micro-batch mean
    # per masked token and per sequence: a held-out mean that does not depend on how batches split
    "mlm_loss_sum": lambda out, batch, zero: out.mlm_loss.detach().double() * out.mlm_count.double(),
    "nsp_loss_sum": lambda out, batch, zero: (_or_zero(out.nsp_loss, zero).detach().double()
                                               * batch["input_ids"].shape[0]),
    "mlm_correct": lambda out, batch, zero: out.mlm_correct,
    "mlm_count": lambda out, batch, zero: out.mlm_count,
    "nsp_correct": lambda out, batch, zero: _or_zero(out.nsp_correct, zero),
    "micro_batches": lambda out, batch, zero: zero.new_ones(()),
    "sequences": lambda out, batch, zero: zero.new_tensor(float(batch["input_ids"].shape[0])),
    "tokens": _tokens,
}
STAT_NAMES = tuple(MICRO_BATCH_STATS)


def micro_batch_stats(out: StepOutput, batch: dict[str, torch.Tensor], zero: torch.Tensor) -> torch.Tensor:
    """MICRO_BATCH_STATS of one forward pass, as one float64 tensor in STAT_NAMES order."""
    return torch.stack([stat(out, batch, zero).double() for stat in MICRO_BATCH_STATS.values()])


def named_stats(sums: torch.Tensor) -> dict[str, float]:
    """Summed statistics (STAT_NAMES order, e.g. after the allreduce) by name."""
    return dict(zip(STAT_NAMES, sums.tolist()))


def pretraining_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    with_nsp = "next_sentence_label" in batch
    hooks = families.family_of_model(model).hooks
    # Packed MLM sequences have no padding: no mask lets SDPA take its fastest kernel.
    attention_mask = batch["attention_mask"] if "attention_mask" in batch else None
    encoder, mlm_head = hooks.encode(model, batch, attention_mask)
    hidden = encoder.last_hidden_state
    positions = batch["masked_positions"]
    gathered = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
    logits = mlm_head(gathered).float()
    labels = batch["masked_labels"]
    mlm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE_INDEX)
    valid = labels != IGNORE_INDEX
    mlm_correct = ((logits.argmax(-1) == labels) & valid).sum()
    loss, nsp_loss, nsp_correct = mlm_loss, None, None
    if with_nsp:
        nsp_logits = hooks.nsp_logits(model, encoder).float()
        nsp_loss = F.cross_entropy(nsp_logits, batch["next_sentence_label"])
        nsp_correct = (nsp_logits.argmax(-1) == batch["next_sentence_label"]).sum()
        loss = mlm_loss + nsp_loss
    return StepOutput(loss=loss, mlm_loss=mlm_loss, mlm_correct=mlm_correct, mlm_count=valid.sum(),
                      nsp_loss=nsp_loss, nsp_correct=nsp_correct)


class PretrainingForward(torch.nn.Module):
    """The training forward (`pretraining_loss`) as a module's forward. It owns no weights of its own:
    it exists so that a data-parallel wrapper which hooks `forward` (PyTorch DDP in the benchmark's
    peer) runs hvdbert's gather-first loss; Horovod leaves it as it is."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return pretraining_loss(self.model, batch)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
