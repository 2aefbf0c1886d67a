"""The model: transformers' BertForPreTraining, randomly initialised from the recipe.

The training forward pass runs the encoder and then the MLM head only at the masked positions
(gather first): at 15% masking this skips most of the vocabulary projection, the largest single
matrix multiply in BERT's head. The module's weights are exactly BertForPreTraining's, so export
is `save_pretrained`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForPreTraining

from hvdbert.data.masking import IGNORE_INDEX


def build_model(model_fields: dict, with_nsp: bool) -> BertForPreTraining:
    config = BertConfig(**model_fields)
    model = BertForPreTraining._from_config(config, attn_implementation="sdpa")
    if not with_nsp:
        # MLM-only data: the pooler and the next-sentence head get no gradient; freeze them so the
        # optimizer and Horovod's allreduce skip them. They are still saved, as BertForPreTraining's.
        for module in (model.bert.pooler, model.cls.seq_relationship):
            if module is not None:
                module.requires_grad_(False)
    return model


def compile_model(model: BertForPreTraining) -> None:
    """train.compile: torch.compile the encoder and the MLM head, the modules of every step's
    forward and backward. In place (nn.Module.compile), so the parameter names, and with them
    checkpoints, export and Horovod's allreduce names, stay those of the eager model. The first
    step pays the compilation; batches have one shape per run, so nothing recompiles."""
    model.bert.compile()
    model.cls.predictions.compile()


@dataclass
class StepOutput:
    loss: torch.Tensor  # what backward() sees: MLM (+ NSP) loss
    mlm_loss: torch.Tensor
    mlm_correct: torch.Tensor  # correctly predicted masked tokens (a count)
    mlm_count: torch.Tensor  # masked tokens
    nsp_loss: torch.Tensor | None


def pretraining_loss(model: BertForPreTraining, batch: dict[str, torch.Tensor]) -> StepOutput:
    with_nsp = "next_sentence_label" in batch
    encoder = model.bert(
        input_ids=batch["input_ids"],
        # Packed MLM sequences have no padding: no mask lets SDPA take its fastest kernel.
        attention_mask=batch["attention_mask"] if "attention_mask" in batch else None,
        token_type_ids=batch.get("token_type_ids"),
    )
    hidden = encoder.last_hidden_state
    positions = batch["masked_positions"]
    gathered = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1)))
    logits = model.cls.predictions(gathered).float()
    labels = batch["masked_labels"]
    mlm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE_INDEX)
    valid = labels != IGNORE_INDEX
    mlm_correct = ((logits.argmax(-1) == labels) & valid).sum()
    loss, nsp_loss = mlm_loss, None
    if with_nsp:
        nsp_logits = model.cls.seq_relationship(encoder.pooler_output).float()
        nsp_loss = F.cross_entropy(nsp_logits, batch["next_sentence_label"])
        loss = mlm_loss + nsp_loss
    return StepOutput(loss=loss, mlm_loss=mlm_loss, mlm_correct=mlm_correct, mlm_count=valid.sum(),
                      nsp_loss=nsp_loss)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
