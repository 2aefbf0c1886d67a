"""BERT (Devlin et al. 2018): transformers' BertForPreTraining, masked LM plus next-sentence prediction.

The family's hooks (families.FamilyHooks): what model.py, export.py and bench/flops.py ask of it.
transformers is imported inside them, so that reading a recipe does not load it.
"""
from __future__ import annotations

from pathlib import Path

from hvdbert.errors import UsageError

# Named model shapes (BertConfig fields). mini and small: Turc et al. 2019 ("Well-Read Students Learn
# Better"), with an 8192-token vocabulary (docs/performance.md's CPU measurements); base and large: Devlin
# et al. 2018 with NVIDIA's vocabulary padded to a multiple of 8.
SHAPES = {
    "mini": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024),
    "small": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                  intermediate_size=2048),
    "base": dict(vocab_size=30528, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "large": dict(vocab_size=30528, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096),
}

# The [model] fields config.py checks beyond what BertConfig refuses itself, by kind.
ACTIVATION_FIELDS = ("hidden_act",)
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob")
NORM_EPS_FIELDS = ("layer_norm_eps",)


def token_ids(special_ids: dict[str, int]) -> dict[str, int]:
    return {}  # BertConfig's pad_token_id (0) is [PAD] in every tokenizer hvdbert prepares


def encode(model, batch: dict, attention_mask):
    encoder = model.bert(input_ids=batch["input_ids"], attention_mask=attention_mask,
                         token_type_ids=batch.get("token_type_ids"))
    return encoder, model.cls.predictions


def nsp_logits(model, encoder):
    return model.cls.seq_relationship(encoder.pooler_output)


def compiled_modules(model) -> tuple:
    return (model.bert, model.cls.predictions)


def prepare_for_training(model, with_nsp: bool) -> None:
    if not with_nsp:
        # MLM-only data: the pooler and the next-sentence head get no gradient; freeze them so the
        # optimizer and Horovod's allreduce skip them. They are still saved, as BertForPreTraining's.
        for module in (model.bert.pooler, model.cls.seq_relationship):
            if module is not None:
                module.requires_grad_(False)


def exported(model, with_nsp: bool, source: Path):
    """BertForPreTraining as trained when it learned NSP, else BertForMaskedLM (the encoder and the
    MLM head: what fill-mask pipelines and fine-tuning load)."""
    from transformers import BertForMaskedLM

    if with_nsp:
        return model
    masked_lm = BertForMaskedLM(model.config)
    missing, unexpected = masked_lm.bert.load_state_dict(model.bert.state_dict(), strict=False)
    if missing or any(not key.startswith("pooler.") for key in unexpected):
        raise UsageError(f"{source}: cannot map the encoder onto BertForMaskedLM ({missing or unexpected})")
    masked_lm.cls.predictions.load_state_dict(model.cls.predictions.state_dict())
    return masked_lm


def training_flops_per_sequence(model_fields: dict, seq_len: int, head_positions: int) -> float:
    """Model FLOPs of one training pass (forward + backward = 3 x forward) over one sequence.

    Per token and layer the encoder multiplies by 4 H^2 (Q, K, V, output) + 2 H I (feed-forward)
    weights: 2 FLOPs per multiply-add, x3 for training, gives 6 x (encoder weights) per token. The
    attention scores and their weighted sum (QK^T, AV) add 2 x 2 x S x H per token and layer forward,
    12 x L x H x S with backward. The MLM head (transform H^2 + decoder H x V) is counted at
    `head_positions` positions per sequence: all S for a full head (HF's BertForMaskedLM), the
    max_predictions_per_seq gathered slots for hvdbert's gather-first head, which is the work it
    really does. Embedding lookups, biases, LayerNorm and softmax are not counted (standard 6N rule).
    """
    fields = {**SHAPES["base"], **model_fields}
    hidden, layers = fields["hidden_size"], fields["num_hidden_layers"]
    intermediate, vocab = fields["intermediate_size"], fields["vocab_size"]
    encoder_weights = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    encoder = 6 * encoder_weights * seq_len + 12 * layers * hidden * seq_len * seq_len
    head = 6 * (hidden * hidden + hidden * vocab) * head_positions
    return float(encoder + head)
