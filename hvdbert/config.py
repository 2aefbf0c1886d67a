"""Recipes: TOML files with inheritance, `--set` overrides and strict validation.

Every default lives here, once, in the dataclasses below. A recipe names sections (`[train]`,
`[batch]`, ...) whose keys must be fields of the matching dataclass; `[model]` takes the keyword
arguments of transformers' `BertConfig`. Unknown keys and wrong types are rejected with a message
naming the file, the key and what would be valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvdbert.errors import UsageError


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps at the reference worker count
    seed: int = 42
    log_every: int = 10  # steps between logged (and cross-rank averaged) metrics
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 scales the loss: torch.amp.GradScaler, CUDA or CPU)
    grad_clip_norm: float = 1.0  # global L2 norm; 0 disables clipping
    max_bad_steps: int = 10  # consecutive non-finite losses before training stops
    progress_bar: bool = True  # tqdm bar on rank 0
    compile: bool = False  # torch.compile the encoder and the MLM head (model.compile_model)


@dataclass
class BatchConfig:
    global_batch_size: int = 256  # sequences per optimizer step at the reference worker count
    micro_batch_size: int = 32  # sequences per worker per forward/backward pass
    reference_workers: int = 1  # the worker count the recipe's numbers were tuned for
    # fixed-global: the global batch stays; accumulation = global / (workers x micro); LR unchanged.
    # per-worker: the global batch grows with the workers; LR scaled by optim.lr_scaling.
    scaling: str = "fixed-global"


@dataclass
class OptimConfig:
    name: str = "lamb"  # lamb | adamw
    lr: float = 1e-3  # peak learning rate at the reference worker count
    lr_scaling: str = "none"  # none | linear (Goyal et al. 2017) | sqrt (You et al. 2019); per-worker only
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6
    warmup_proportion: float = 0.01  # of max_steps, linear from 0 to the peak
    decay_power: float = 1.0  # polynomial decay after warmup; 0.5 in NVIDIA's BERT recipes
    end_lr: float = 0.0


@dataclass
class DataConfig:
    max_seq_len: int = 128
    format: str = "mlm"  # of the prepared data: mlm (packed text) | nsp (sentence pairs, trains NSP too)
    max_predictions_per_seq: int = 20  # 20 at 128 and 80 at 512 (Devlin et al. 2018)
    mask_prob: float = 0.15  # Devlin et al. 2018: 15% of tokens, of those 80% [MASK], 10% random, 10% kept
    whole_word_masking: bool = False
    prefetch_batches: int = 4  # micro-batches prepared ahead by the background loader thread
    builtin_max_documents: int = 0  # embedded corpus only: 0 takes every document
    record_sample_ids: bool = False  # RUN_DIR/sample_ids/rank-<r>.txt: one line of sample ids per step


@dataclass
class DistConfig:
    fp16_allreduce: bool = False  # hvd.Compression.fp16: half the bytes on the wire
    threads_per_worker: int = 1  # torch intra-op threads per rank on CPU
    fusion_threshold_mb: int = 64  # HOROVOD_FUSION_THRESHOLD
    cycle_time_ms: float = 0.0  # HOROVOD_CYCLE_TIME; 0 = by device: 10 on CPU/Gloo, 1 with CUDA


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep: int = 3
    init_from: str = ""  # a checkpoint whose weights (only) start this run, e.g. phase 1 for phase 2


@dataclass
class ElasticConfig:
    commit_every: int = 10  # steps between hvd.elastic state commits


@dataclass
class Recipe:
    train: TrainConfig = field(default_factory=TrainConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    model: dict[str, Any] = field(default_factory=dict)  # BertConfig keyword arguments
    source: str = ""  # the recipe file this came from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_field(self, name: str) -> Any:
        """A BertConfig field as this recipe sets it, else BertConfig's own default."""
        return self.model[name] if name in self.model else bert_config_fields()[name]


CHOICES = {
    "train.precision": ("fp32", "bf16", "fp16"),
    "batch.scaling": ("fixed-global", "per-worker"),
    "optim.name": ("lamb", "adamw"),
    "optim.lr_scaling": ("none", "linear", "sqrt"),
    "data.format": ("mlm", "nsp"),
}

_SECTION_CLASSES = {
    "train": TrainConfig,
    "batch": BatchConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "dist": DistConfig,
    "checkpoint": CheckpointConfig,
    "elastic": ElasticConfig,
}


def bert_config_fields() -> dict[str, Any]:
    """The BertConfig keyword arguments a recipe's [model] may set, with their defaults."""
    from transformers import BertConfig

    parameters = inspect.signature(BertConfig.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _valid_list(names) -> str:
    return ", ".join(sorted(names))


def _unknown(where: str, key: str, known) -> UsageError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return UsageError(f"{where}: unknown key {key}; {hint}valid keys: {_valid_list(known)}")


def _check_type(where: str, key: str, value: Any, default: Any) -> Any:
    """Return value converted to the type of default, or raise naming the key and the type wanted."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        wanted = "true or false"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        wanted = "an integer"
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        wanted = "a number"
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        wanted = "a string"
    else:  # BertConfig fields whose default is None take what BertConfig takes
        return value
    raise UsageError(f"{where}: {key} = {value!r} has the wrong type; expected {wanted}")


def _deep_merge(base: dict, child: dict) -> dict:
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe_tree(path: Path, _chain: tuple[Path, ...] = ()) -> dict:
    """Read a TOML recipe and everything it inherits (deep merge, the child wins)."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path))
        raise UsageError(f"{path}: recipe inheritance forms a cycle: {cycle}")
    if not path.is_file():
        raise UsageError(f"recipe file not found: {path}; pass an existing .toml file (see recipes/)")
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path}: not valid TOML: {error}") from None
    inherit = tree.pop("inherit", [])
    if isinstance(inherit, str):
        inherit = [inherit]
    if not isinstance(inherit, list) or not all(isinstance(p, str) for p in inherit):
        raise UsageError(f"{path}: inherit must be a list of recipe file names, got {inherit!r}")
    merged: dict = {}
    for parent in inherit:
        merged = _deep_merge(merged, read_recipe_tree(path.parent / parent, (*_chain, path)))
    return _deep_merge(merged, tree)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value`: the value is read as TOML (3, 1e-3, true, "x"), else taken as a string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UsageError(f"--set {text!r}: expected section.key=value, e.g. --set train.max_steps=100")
    dotted, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return dotted.strip().split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {text!r}: {key} is not a section")
        node[keys[-1]] = value
    return tree


def recipe_from_tree(tree: dict, where: str) -> Recipe:
    """Validate a merged recipe tree against the dataclasses and BertConfig."""
    recipe = Recipe(source=where)
    for section, values in tree.items():
        if section == "model":
            recipe.model = _validate_model(where, values)
            continue
        if section not in _SECTION_CLASSES:
            raise _unknown(where, section, [*_SECTION_CLASSES, "model", "inherit"])
        if not isinstance(values, dict):
            raise UsageError(f"{where}: {section} must be a table ([{section}]), got {values!r}")
        config = getattr(recipe, section)
        known = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in known:
                raise _unknown(where, dotted, [f"{section}.{k}" for k in known])
            value = _check_type(where, dotted, value, known[key])
            if dotted in CHOICES and value not in CHOICES[dotted]:
                raise UsageError(
                    f"{where}: {dotted} = {value!r} is not valid; choose one of {', '.join(CHOICES[dotted])}"
                )
            setattr(config, key, value)
    _check_ranges(recipe, where)
    return recipe


def _validate_model(where: str, values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise UsageError(f"{where}: model must be a table ([model]) of BertConfig fields")
    known = bert_config_fields()
    model = {}
    for key, value in values.items():
        if key not in known:
            raise _unknown(where, f"model.{key}", [f"model.{k}" for k in known])
        model[key] = _check_type(where, f"model.{key}", value, known[key])
    return model


def _check_ranges(recipe: Recipe, where: str) -> None:
    positive = {
        "train.max_steps": recipe.train.max_steps,
        "train.log_every": recipe.train.log_every,
        "batch.global_batch_size": recipe.batch.global_batch_size,
        "batch.micro_batch_size": recipe.batch.micro_batch_size,
        "batch.reference_workers": recipe.batch.reference_workers,
        "optim.lr": recipe.optim.lr,
        "data.max_seq_len": recipe.data.max_seq_len,
        "data.max_predictions_per_seq": recipe.data.max_predictions_per_seq,
        "dist.threads_per_worker": recipe.dist.threads_per_worker,
        "checkpoint.every_steps": recipe.checkpoint.every_steps,
        "checkpoint.keep": recipe.checkpoint.keep,
        "elastic.commit_every": recipe.elastic.commit_every,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UsageError(f"{where}: {key} = {value} must be greater than 0")
    if recipe.dist.cycle_time_ms < 0:
        raise UsageError(f"{where}: dist.cycle_time_ms = {recipe.dist.cycle_time_ms} must be 0 (by device) or more")
    if not 0.0 <= recipe.optim.warmup_proportion < 1.0:
        raise UsageError(f"{where}: optim.warmup_proportion = {recipe.optim.warmup_proportion} must be in [0, 1)")
    if not 0.0 < recipe.data.mask_prob < 1.0:
        raise UsageError(f"{where}: data.mask_prob = {recipe.data.mask_prob} must be in (0, 1)")
    if recipe.data.max_seq_len < 8:
        raise UsageError(f"{where}: data.max_seq_len = {recipe.data.max_seq_len} must be at least 8")
    positions = recipe.model_field("max_position_embeddings")
    if recipe.data.max_seq_len > positions:
        raise UsageError(
            f"{where}: data.max_seq_len = {recipe.data.max_seq_len} exceeds "
            f"model.max_position_embeddings = {positions}; raise model.max_position_embeddings"
        )


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge, override and validate a recipe file."""
    tree = apply_overrides(read_recipe_tree(Path(path)), list(overrides or []))
    return recipe_from_tree(tree, str(path))


def recipe_from_dict(resolved: dict) -> Recipe:
    """Rebuild a Recipe from Recipe.to_dict() output (as stored in recipe.json and checkpoints)."""
    tree = {k: v for k, v in resolved.items() if k != "source"}
    return recipe_from_tree(tree, resolved.get("source", "recipe.json"))
