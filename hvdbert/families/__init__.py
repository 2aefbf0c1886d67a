"""Model families: which transformers model a recipe's `[model]` section describes.

`model.architecture` picks the family (`bert`, the default, or `modernbert`); the other `[model]` keys
are the keyword arguments of that family's transformers config class (`BertConfig`,
`ModernBertConfig`). This package is the one place that knows, per family, the config class, the
model class that training, checkpoints and export share, the few facts the rest of hvdbert asks
about (does it have next-sentence prediction, which fields may change from one phase to the next),
and its hooks (`FamilyHooks`): the module families/<name>.py that model.py, export.py and
bench/flops.py call instead of asking which family they hold. Adding a family is that module plus
one entry in FAMILIES.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hvdbert.families import bert, modernbert


class FamilyHooks(Protocol):
    """What a family's module (families/<name>.py) defines. `model` is the family's model class
    (or, for evaluation of an exported model, its masked-LM class)."""

    # The config's own names for fields config.py range-checks: an activation (one of transformers'
    # ACT2FN), dropout probabilities (in [0, 1)), a norm's epsilon (> 0).
    ACTIVATION_FIELDS: tuple[str, ...]
    DROPOUT_FIELDS: tuple[str, ...]
    NORM_EPS_FIELDS: tuple[str, ...]

    def token_ids(self, special_ids: dict[str, int]) -> dict[str, int]:
        """Config token ids that must name the run's tokenizer's [PAD], [CLS], [SEP] (none if the
        config's defaults already do)."""

    def encode(self, model, batch: dict, attention_mask) -> tuple[Any, Any]:
        """The encoder's output (with last_hidden_state; pooler_output where NSP is trained) and the
        MLM head (hidden states -> vocabulary logits)."""

    def nsp_logits(self, model, encoder):
        """Next-sentence logits from the encoder's output (families with NSP only)."""

    def compiled_modules(self, model) -> tuple:
        """The modules of every step's forward and backward, which train.compile compiles."""

    def prepare_for_training(self, model, with_nsp: bool) -> None:
        """Adjust a fresh model to the data (e.g. freeze a head the data does not train)."""

    def exported(self, model, with_nsp: bool, source: Path):
        """The transformers model export writes, from the trained `model` (`source`: for messages)."""

    def training_flops_per_sequence(self, model_fields: dict, seq_len: int, head_positions: int) -> float:
        """Model FLOPs of one training pass over one sequence, the MLM head at `head_positions`."""


ARCHITECTURE = "architecture"  # the [model] key that names the family


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str  # in transformers
    model_class: str  # what training, checkpoints and export hold (its own parameter names)
    has_nsp: bool  # next-sentence prediction head (BERT only; ModernBERT trains MLM alone)
    hooks: FamilyHooks  # the family's module, families/<name>.py
    # Keyword arguments the config class reads from **kwargs rather than declaring, with their
    # defaults as the config class applies them (ModernBertConfig.__post_init__ and
    # convert_rope_params_to_dict); they are the names of ModernBERT's published config.json.
    extra_fields: tuple[tuple[str, Any], ...] = ()
    # Fields a later phase may change when it starts from an earlier phase's weights
    # (checkpoint.init_from): longer context, and ModernBERT's larger global RoPE theta for it.
    phase_fields: tuple[str, ...] = ("max_position_embeddings",)


FAMILIES = {
    "bert": Family("bert", "BertConfig", "BertForPreTraining", has_nsp=True, hooks=bert),
    "modernbert": Family(
        "modernbert", "ModernBertConfig", "ModernBertForMaskedLM", has_nsp=False, hooks=modernbert,
        extra_fields=(("global_attn_every_n_layers", 3), ("global_rope_theta", 160_000.0),
                      ("local_rope_theta", 10_000.0)),
        phase_fields=("max_position_embeddings", "global_rope_theta", "local_rope_theta"),
    ),
}
DEFAULT_ARCHITECTURE = "bert"  # recipes without model.architecture are BERT recipes


def family_of(model_fields: dict) -> Family:
    """The family a (validated) [model] section describes."""
    return FAMILIES[model_fields.get(ARCHITECTURE, DEFAULT_ARCHITECTURE)]


def config_fields(family: Family) -> dict[str, Any]:
    """The config keyword arguments a recipe's [model] may set for `family`, with their defaults."""
    import transformers

    config_class = getattr(transformers, family.config_class)
    parameters = inspect.signature(config_class.__init__).parameters.values()
    fields = {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {**fields, **dict(family.extra_fields)}


def config_kwargs(model_fields: dict) -> dict[str, Any]:
    """The [model] section without the family key: what the config class takes."""
    return {k: v for k, v in model_fields.items() if k != ARCHITECTURE}


def build_config(model_fields: dict):
    import transformers

    return getattr(transformers, family_of(model_fields).config_class)(**config_kwargs(model_fields))


def model_class(model_fields: dict):
    import transformers

    return getattr(transformers, family_of(model_fields).model_class)


def with_token_ids(model_fields: dict, special_ids: dict[str, int]) -> dict:
    """A run's tokenizer is the one its data was prepared with: its ids fill the config token ids
    the family needs and the recipe leaves unset (ModernBERT's default to its published 50k
    tokenizer's; the padding embedding row and export's config must name this tokenizer's)."""
    return {**family_of(model_fields).hooks.token_ids(special_ids), **model_fields}


def family_of_model(model) -> Family:
    """The family of a built model (ours, or a transformers masked-LM directory's): the config's
    model_type is the family's name."""
    return FAMILIES[model.config.model_type]


def attention_implementation(device_type: str) -> str:
    """flash-attn's kernels on CUDA where the package is installed (transformers' ModernBERT runs its
    sliding windows there natively); PyTorch's SDPA everywhere else, CPU included."""
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def same_model(saved: dict, current: dict) -> tuple[dict, dict]:
    """Two [model] sections with the family written out, so that a BERT checkpoint from before
    `model.architecture` existed compares equal to a recipe that names `bert`."""
    def full(fields: dict) -> dict:
        return {ARCHITECTURE: DEFAULT_ARCHITECTURE, **fields}

    return full(saved), full(current)
