"""ModernBERT (Warner et al. 2024): transformers' ModernBertForMaskedLM, masked LM only.

The family's hooks (families.FamilyHooks): what model.py, export.py and bench/flops.py ask of it.
transformers is imported inside them, so that reading a recipe does not load it.
"""
from __future__ import annotations

from pathlib import Path

# The [model] fields config.py checks beyond what ModernBertConfig refuses itself, by kind.
ACTIVATION_FIELDS = ("hidden_activation",)
DROPOUT_FIELDS = ("attention_dropout", "mlp_dropout", "embedding_dropout")
NORM_EPS_FIELDS = ("norm_eps",)


def token_ids(special_ids: dict[str, int]) -> dict[str, int]:
    # ModernBertConfig's token ids default to its published 50k tokenizer's: the run's own fill them.
    return {"pad_token_id": special_ids["pad"], "cls_token_id": special_ids["cls"],
            "sep_token_id": special_ids["sep"], "bos_token_id": special_ids["cls"],
            "eos_token_id": special_ids["sep"]}


def encode(model, batch: dict, attention_mask):
    encoder = model.model(input_ids=batch["input_ids"], attention_mask=attention_mask)  # no token types, no pooler
    return encoder, lambda hidden: model.decoder(model.head(hidden))


def nsp_logits(model, encoder):
    # config.py refuses data.format = nsp for a family without a next-sentence head
    raise ValueError("ModernBERT has no next-sentence head")


def compiled_modules(model) -> tuple:
    return (model.model, model.head, model.decoder)


def prepare_for_training(model, with_nsp: bool) -> None:
    pass  # no head goes untrained: ModernBERT has no next-sentence head


def exported(model, with_nsp: bool, source: Path):
    # Trained as ModernBertForMaskedLM itself. A classifier fine-tuned from it pools the mean of the
    # tokens: masked LM alone never trains the first token's output, which "cls" pooling classifies.
    model.config.classifier_pooling = "mean"
    return model


def training_flops_per_sequence(model_fields: dict, seq_len: int, head_positions: int) -> float:
    """Model FLOPs of one ModernBERT training pass over one sequence, counted as for BERT (6 x weights
    per token, 12 x H x keys per token and layer for attention), with ModernBERT's real work:

    - weights per layer: Wqkv (3 H^2) + Wo (H^2) + GeGLU's Wi (H x 2I: gate and value) + Wo (I x H);
    - attention keys per query: S in the global layers, the sliding window's 2 x (local_attention // 2)
      + 1 keys (at most S) in the others, as transformers' ModernBERT masks them;
    - the head (dense H^2 + decoder H x V) at `head_positions` positions: the gathered masked slots
      for hvdbert's gather-first head, all S for transformers' dense head.
    """
    from hvdbert.families import build_config, with_token_ids

    config = build_config(with_token_ids(model_fields, {"pad": 0, "cls": 0, "sep": 0}))
    hidden, intermediate, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    window_keys = min(seq_len, 2 * (config.local_attention // 2) + 1)
    weights_per_layer = 4 * hidden * hidden + 3 * hidden * intermediate
    encoder = 0
    for layer_type in config.layer_types:
        keys = seq_len if layer_type == "full_attention" else window_keys
        encoder += 6 * weights_per_layer * seq_len + 12 * hidden * seq_len * keys
    head = 6 * (hidden * hidden + hidden * vocab) * head_positions
    return float(encoder + head)
