"""Recipes: TOML files with inheritance, `--set` overrides and strict validation.

Every default lives here, once, in the dataclasses below. A recipe names sections (`[train]`,
`[batch]`, ...) whose keys must be fields of the matching dataclass; `[model]` takes
`architecture` (`bert`, the default, or `modernbert`: hvdbert/families/) and the keyword arguments
of that family's transformers config class (`BertConfig`, `ModernBertConfig`). Unknown keys and wrong types are rejected with a message
naming the file, the key and what would be valid.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable

from hvdbert import families
from hvdbert.errors import UsageError
from hvdbert.optimizers import OPTIMIZERS


def choice(default: str, *allowed: str):
    """A string field whose value must be one of `allowed` (the default first, listed once)."""
    return field(default=default, metadata={"choices": tuple(dict.fromkeys((default, *allowed)))})


def bounded(default, valid: Callable[[Any], bool], rule: str):
    """A numeric field whose value must satisfy `valid`; `rule` says so in the error message."""
    return field(default=default, metadata={"valid": valid, "rule": rule})


def positive(default):
    return bounded(default, lambda value: value > 0, "must be greater than 0")  # NaN fails too


def counted(default: int, least: int, most: int):
    """An integer field from `least` to `most`: every count has a ceiling, so no size, and no search
    over sizes (plan's worker counts), runs away with a mistyped number."""
    return bounded(default, lambda value: least <= value <= most, f"must be from {least} to {most}")


# Ceilings beyond any real run. The largest BERT global batches are 65536 (You et al. 2019) and the
# largest Horovod jobs some thousands of workers (Summit's 27648 GPUs): 256x and 37x those.
MAX_GLOBAL_BATCH_SIZE = 2**24  # sequences per optimizer step
MAX_WORKERS = 2**20
# BERT trains 1M optimizer steps, ModernBERT under 1M: a thousand times that still keeps the samples a
# run counts (steps x global batch) within int64, where the data stream's positions live.
MAX_STEPS = 10**9
MAX_SEED = 2**63 - 1  # torch.manual_seed takes it, and the data stream hashes seeds as uint64


def at_least_zero(default, zero_means: str = ""):
    """A number that must not be negative; `zero_means` says what 0 does, where it is special."""
    rule = f"must be 0 ({zero_means}) or more" if zero_means else "must be 0 or more"
    return bounded(default, lambda value: value >= 0, rule)  # NaN fails too


def fraction_below_one(default):
    return bounded(default, lambda value: 0.0 <= value < 1.0, "must be in [0, 1)")


@dataclass
class TrainConfig:
    max_steps: int = counted(1000, 1, MAX_STEPS)  # optimizer steps at the reference worker count
    seed: int = counted(42, 0, MAX_SEED)
    log_every: int = counted(10, 1, MAX_STEPS)  # steps between logged (and cross-rank averaged) metrics
    # fp16 scales the loss (torch.amp.GradScaler, on CUDA or, where torch has it, on CPU)
    precision: str = choice("fp32", "bf16", "fp16")
    grad_clip_norm: float = at_least_zero(1.0, "no clipping")  # global L2 norm
    # consecutive non-finite losses before training stops (0: the first one stops it)
    max_bad_steps: int = counted(10, 0, MAX_STEPS)
    progress_bar: bool = True  # rank 0: a tqdm bar on a terminal, else a line every log_every steps
    compile: bool = False  # torch.compile the encoder and the MLM head (model.compile_model)


@dataclass
class BatchConfig:
    # sequences per optimizer step at the reference worker count
    global_batch_size: int = counted(256, 1, MAX_GLOBAL_BATCH_SIZE)
    micro_batch_size: int = counted(32, 1, MAX_GLOBAL_BATCH_SIZE)  # sequences per worker per forward/backward pass
    reference_workers: int = counted(1, 1, MAX_WORKERS)  # the worker count the recipe's numbers were tuned for
    # fixed-global: the global batch stays; accumulation = global / (workers x micro).
    # per-worker: the global batch grows with the workers; max_steps shrink to keep the samples.
    # Either way the LR follows the global batch by optim.lr_scaling (hvdbert/plan.py).
    scaling: str = choice("fixed-global", "per-worker")


@dataclass
class OptimConfig:
    name: str = choice("lamb", *OPTIMIZERS)  # the optimizer table: hvdbert/optimizers.py
    lr: float = positive(1e-3)  # peak learning rate at reference_global_batch_size
    # The global batch optim.lr belongs to. 0: the batch.global_batch_size the recipe files state, so a
    # `--set batch.global_batch_size=...` (or per-worker growth) derives a rate (load_recipe pins it).
    reference_global_batch_size: int = bounded(
        0, lambda v: 0 <= v <= MAX_GLOBAL_BATCH_SIZE,
        f"must be 0 (the recipe's batch.global_batch_size) or more, at most {MAX_GLOBAL_BATCH_SIZE}")
    # How the rate follows the global batch when it differs from the reference: sqrt (You et al. 2019,
    # LAMB), linear (Goyal et al. 2017), none (keep the rate; a warning says so), auto: the optimizer's
    # own rule (optimizers.OPTIMIZERS: sqrt for lamb, linear for adamw and stableadamw).
    lr_scaling: str = choice("auto", "sqrt", "linear", "none")
    weight_decay: float = at_least_zero(0.01)
    # Adam's moment decay rates: at 1 the moments never forget (and StableAdamW divides by 1 - beta2)
    beta1: float = fraction_below_one(0.9)
    beta2: float = fraction_below_one(0.999)
    eps: float = positive(1e-6)
    warmup_proportion: float = fraction_below_one(0.01)  # of max_steps
    # polynomial: warmup, then decay to end_lr over the rest of max_steps (BERT).
    # wsd: warmup, stable at lr, then decay to end_lr over the last decay_proportion of max_steps
    # (warmup-stable-decay, the trapezoid ModernBERT trains with; Warner et al. 2024).
    schedule: str = choice("polynomial", "wsd")
    # polynomial decay after warmup; 0.5 in NVIDIA's BERT recipes
    decay_power: float = at_least_zero(1.0, "hold the peak rate")
    decay_proportion: float = bounded(0.0, lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")  # wsd: of max_steps
    decay_shape: str = choice("linear", "1-sqrt")  # wsd's decay: 1 - t or 1 - sqrt(t) over the tail
    end_lr: float = at_least_zero(0.0)  # a negative rate would climb the loss


@dataclass
class DataConfig:
    max_seq_len: int = bounded(128, lambda v: v >= 8, "must be at least 8")
    # of the prepared data: mlm (packed text) | nsp (sentence pairs, trains NSP too)
    format: str = choice("mlm", "nsp")
    max_predictions_per_seq: int = positive(20)  # 20 at 128 and 80 at 512 (Devlin et al. 2018)
    # Devlin et al. 2018: 15% of tokens, of those 80% [MASK], 10% random, 10% kept
    mask_prob: float = bounded(0.15, lambda v: 0.0 < v < 1.0, "must be in (0, 1)")
    whole_word_masking: bool = False
    prefetch_batches: int = counted(4, 1, 1024)  # micro-batches prepared ahead by the background loader thread
    builtin_max_documents: int = at_least_zero(0, "every document")  # embedded corpus only
    record_sample_ids: bool = False  # RUN_DIR/sample_ids/rank-<r>.txt: one line of sample ids per step


@dataclass
class DistConfig:
    fp16_allreduce: bool = False  # hvd.Compression.fp16: half the bytes on the wire
    threads_per_worker: int = counted(1, 1, 4096)  # torch intra-op threads per rank on CPU
    fusion_threshold_mb: int = counted(64, 0, 65536)  # HOROVOD_FUSION_THRESHOLD; 0 fuses nothing
    # HOROVOD_CYCLE_TIME; 0 = by device: 10 on CPU/Gloo, 1 with CUDA
    cycle_time_ms: float = at_least_zero(0.0, "by device")
    # HOROVOD_CACHE_CAPACITY: responses Horovod caches so that a step's known tensors skip negotiation;
    # 1024 is Horovod's own default, 0 turns the cache off
    cache_capacity: int = counted(1024, 0, 2**20)
    # Gradients reduced in buckets of about this many MB (float32) as backward fills them, one
    # allreduce per bucket, as DDP does; 0: Horovod's DistributedOptimizer, one allreduce per tensor
    # fused by Horovod's cycle. For compression none and fp16: bf16 and powersgd reduce every
    # gradient at once after backward, with or without it (as they ignore fusion_threshold_mb)
    bucket_mb: float = at_least_zero(0.0, "Horovod's per-tensor allreduces")
    # HOROVOD_AUTOTUNE: Horovod searches fusion threshold, cycle time and the cache itself (Bayesian
    # optimisation over the first steps), so fusion_threshold_mb and cycle_time_ms are not set
    autotune: bool = False
    autotune_log: str = ""  # HOROVOD_AUTOTUNE_LOG: a CSV of the autotuner's trials (dist.autotune only)
    # Waiting for an allreduce: poll it, sleeping up to this long between polls (from 0.05 ms,
    # doubling), instead of Horovod's own wait, which spins a core at 100% for as long as the network
    # takes: CPU time the workers that compute on the same cores lose (docs/performance.md). 0: Horovod's.
    poll_interval_ms: float = at_least_zero(1.0, "Horovod's spinning wait")
    # A worker that waits this long in one collective ends itself, and so the job (a frozen or cut-off
    # peer; docs/clusters.md). Above the longest legitimate wait: rank 0 writing a BERT-large
    # checkpoint while the others wait at a barrier. 0: wait forever.
    stall_timeout_seconds: float = at_least_zero(600.0, "wait forever")

    # Gradient compression on the wire (docs/compression.md): none (float32), fp16 (Horovod's),
    # bf16 (allgathered, summed in float32), powersgd (rank-r factors with error feedback; Vogels
    # et al. 2019). dist.fp16_allreduce = true is the older spelling of fp16.
    compression: str = choice("none", "fp16", "bf16", "powersgd")
    # the rank of PowerSGD's factors: bytes grow with it, and so does what each step keeps of the
    # gradient. 8: within 0.01 of uncompressed held-out loss on 3 seeds where 4 lost up to 0.03, at
    # 1/62 of BERT-base's bytes (docs/compression.md)
    powersgd_rank: int = counted(8, 1, 4096)
    powersgd_start_step: int = counted(0, 0, MAX_STEPS)  # optimizer steps of plain float32 allreduce first

    @property
    def wire_compression(self) -> str:
        """dist.compression, with dist.fp16_allreduce = true meaning fp16 (_check_ranges refuses a
        conflicting pair)."""
        return "fp16" if self.fp16_allreduce else self.compression


@dataclass
class ClusterConfig:
    """A cluster for the scaling model (hvdbert/scaling.py; `python -m hvdbert.plan --cluster`), not a
    recipe section: the topology, the links and the overlap the model assumes."""

    nodes: int = counted(1, 1, MAX_WORKERS)
    gpus_per_node: int = counted(1, 1, 1024)
    link: str = ""  # inter-node rate per node, tc's notation: 100mbit, 25gbit, 1600gbit (8 x 200 Gbit/s HDR)
    latency_us: float = at_least_zero(10.0)  # one message's inter-node latency, microseconds
    intra: str = "2400gbit"  # rate between the GPUs of a node, per GPU and direction (A100 NVLink: 300 GB/s)
    algorithm: str = choice("auto", "ring", "hierarchical")  # auto: hierarchical with several GPUs per node
    # The fraction of one micro-batch's compute time that hides the allreduce (it starts during the
    # last backward). The shaped hosts measured 0.18 for hvdbert and 0.03 for DDP (docs/performance.md);
    # 0.1 where nothing was measured.
    overlap: float = bounded(0.1, lambda v: 0.0 <= v <= 1.0, "must be from 0 to 1")
    # The compute of one GPU when no measured rate is given: peak FLOP/s x MFU over the family's FLOPs
    # per sequence. 312: A100's dense fp16/bf16 tensor-core peak, TFLOP/s.
    peak_tflops: float = positive(312.0)
    mfu: float = bounded(0.4, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]")
    # 0: no framing counted (RDMA); an MTU: Ethernet/IPv4/TCP headers on the wire, as tx_bytes counts
    mtu: int = bounded(0, lambda v: v == 0 or 576 <= v <= 65536, "must be 0 (no framing) or from 576 to 65536")
    # dist.compression = bf16 | powersgd: the compressor's own compute per step, seconds (bf16's rounding
    # and summing, PowerSGD's factor products and QR), measured on the cluster's workers or given;
    # added to their exposed communication. 0: not counted (docs/compression.md has measured figures).
    compressor_seconds: float = at_least_zero(0.0)
    # CPU seconds per GB a worker sends and receives (network stack, copies, the reduction), taken from
    # compute where the same cores compute (CPU workers: the shaped hosts measure it per system); 0
    # on GPU clusters, where the CPU does not compute
    host_cpu_seconds_per_gb: float = at_least_zero(0.0)
    # a fixed cost per optimizer step that --measured-seq-per-s (measured at another accumulation) or
    # peak x MFU leaves out: the optimizer's update, clipping, the loss scaler's checks; seconds
    optimizer_seconds: float = at_least_zero(0.0)


@dataclass
class CheckpointConfig:
    every_steps: int = counted(1000, 1, MAX_STEPS)
    keep: int = counted(3, 1, MAX_STEPS)
    init_from: str = ""  # a checkpoint whose weights (only) start this run, e.g. phase 1 for phase 2


@dataclass
class ElasticConfig:
    commit_every: int = counted(10, 1, MAX_STEPS)  # steps between hvd.elastic state commits
    # A new rank 0 (its predecessor's host left the job) waits this long for the run directory's
    # lock, which the predecessor holds until its process ends.
    lock_wait_seconds: float = at_least_zero(60.0)


@dataclass
class EvalConfig:
    """Held-out masked-LM evaluation (hvdbert/evaluate.py) on DATA_DIR/validation or --eval-data."""

    every_steps: int = bounded(0, lambda v: 0 <= v <= MAX_STEPS,
                               f"must be 0 (not during training) or more, at most {MAX_STEPS}")
    at_end: bool = False  # evaluate after the last step as well
    max_sequences: int = at_least_zero(2048, "every held-out sequence")
    # A fixed 15% (Devlin et al. 2018), whatever data.mask_prob trains with: runs compare like with like.
    mask_prob: float = bounded(0.15, lambda v: 0.0 < v < 1.0, "must be in (0, 1)")
    seed: int = counted(1234, 0, MAX_SEED)  # the held-out masks and the choice of max_sequences: the same at every evaluation

    @property
    def requested(self) -> bool:
        return self.every_steps > 0 or self.at_end


@dataclass(frozen=True)
class FinetuneConfig:
    """hvdbert.finetune's settings (its flags of the same names): a probe made for an encoder that
    masked LM alone pretrained. Not a recipe section."""

    seed: int = counted(42, 0, MAX_SEED)  # the head's initialisation (from scratch: every weight's) and shuffling
    split_seed: int = counted(0, 0, MAX_SEED)  # which documents form the dev part, and the few-shot draw
    dev_fraction: float = bounded(0.2, lambda v: 0.0 < v < 1.0, "must be in (0, 1), e.g. 0.2")  # of documents
    train_per_class: int = bounded(0, lambda v: v >= 0, "must be 0 (every example) or more, e.g. 16")
    epochs: float = positive(5.0)
    # Two rates: the new head learns from nothing, while the encoder should keep what pretraining gave
    # it; one high rate for both overwrites a young encoder, one low rate leaves the head untrained.
    lr: float = positive(1e-3)  # the head's peak rate (AdamW, linear decay after warmup)
    encoder_lr: float = positive(1e-4)  # the encoder's peak rate
    batch_size: int = positive(32)
    # tokens per example, longer ones cut; never more than the sequence length the encoder was pretrained
    # at (where it is known) nor its max_position_embeddings: positions past those are untrained
    max_length: int = positive(128)
    # mean: the average of the last layer over the non-padding tokens, which masked LM trains at every
    # position; cls: the first token's vector, which masked LM never trains (nothing masks [CLS])
    pooling: str = choice("mean", "cls")
    weight_decay: float = at_least_zero(0.01)  # AdamW's, on every weight but biases and LayerNorms
    warmup_ratio: float = fraction_below_one(0.1)  # of the steps, linear warmup


@dataclass
class Recipe:
    train: TrainConfig = field(default_factory=TrainConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # model.architecture (hvdbert/families/) and that family's config keyword arguments (BertConfig's for bert)
    model: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the recipe file this came from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_field(self, name: str) -> Any:
        """A config field as this recipe sets it, else the family's config class's own default."""
        return self.model[name] if name in self.model else families.config_fields(families.family_of(self.model))[name]


_SECTION_CLASSES = {
    "train": TrainConfig,
    "batch": BatchConfig,
    "optim": OptimConfig,
    "data": DataConfig,
    "dist": DistConfig,
    "checkpoint": CheckpointConfig,
    "elastic": ElasticConfig,
    "eval": EvalConfig,
}


def bert_config_fields() -> dict[str, Any]:
    """The BertConfig keyword arguments a recipe's [model] may set, with their defaults."""
    return families.config_fields(families.FAMILIES["bert"])


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
            # TOML reads nan and inf as floats, and integers of any size, which float() cannot hold
            # beyond 1.8e308: no setting means them
            if isinstance(value, int) and abs(value) > sys.float_info.max or not math.isfinite(value):
                raise UsageError(f"{where}: {key} = {value!r} is not a finite number")
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
    except UnicodeDecodeError as error:
        raise UsageError(f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start}); TOML files are UTF-8") from None
    except OSError as error:
        raise UsageError(f"recipe {path}: cannot read it: {error.strerror}") from None
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


def apply_overrides(tree: dict, overrides: list[str], origins: dict[str, str] | None = None) -> dict:
    """Apply `--set` overrides to `tree`; `origins` (when given) maps each key they touch, and each
    section above it, to the `--set` that set it, so that errors name the flag, not the file."""
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {text!r}: {key} is not a section")
        node[keys[-1]] = value
        if origins is not None:
            for depth in range(1, len(keys) + 1):
                origins[".".join(keys[:depth])] = f"--set {text}"
    return tree


def recipe_from_tree(tree: dict, where: str, origins: dict[str, str] | None = None) -> Recipe:
    """Validate a merged recipe tree against the dataclasses and BertConfig. Errors name `where` (the
    recipe file), or the `--set` that `origins` says a key came from."""
    recipe = Recipe(source=where)
    origins = origins or {}

    def at(dotted: str) -> str:
        return origins.get(dotted, where)

    for section, values in tree.items():
        if section == "model":
            recipe.model = _validate_model(at, values)
            continue
        if section not in _SECTION_CLASSES:
            raise _unknown(at(section), section, [*_SECTION_CLASSES, "model", "inherit"])
        if not isinstance(values, dict):
            raise UsageError(f"{at(section)}: {section} must be a table ([{section}]), got {values!r}")
        config = getattr(recipe, section)
        known = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        for key, value in values.items():
            dotted = f"{section}.{key}"
            if key not in known:
                raise _unknown(at(dotted), dotted, [f"{section}.{k}" for k in known])
            setattr(config, key, _check_type(at(dotted), dotted, value, known[key]))
    if "data.max_seq_len" in origins and "data.max_predictions_per_seq" not in origins:
        recipe.data.max_predictions_per_seq = predictions_for(recipe.data)
    _check_ranges(recipe, at)
    _check_model(recipe, at)
    return recipe


def _validate_model(at, values: Any) -> dict[str, Any]:
    if not isinstance(values, dict):
        raise UsageError(f"{at('model')}: model must be a table ([model]) of model.architecture and its config fields")
    architecture = values.get(families.ARCHITECTURE, families.DEFAULT_ARCHITECTURE)
    if architecture not in families.FAMILIES:
        raise UsageError(f"{at('model')}: model.architecture = {architecture!r} is not valid; "
                         f"choose one of {', '.join(families.FAMILIES)}")
    family = families.FAMILIES[architecture]
    known = families.config_fields(family)
    model = {}
    for key, value in values.items():
        if key == families.ARCHITECTURE:
            model[key] = value
            continue
        if key not in known:
            raise _unknown(at(f"model.{key}"), f"model.{key}", [f"model.{k}" for k in (families.ARCHITECTURE, *known)])
        model[key] = _check_type(at(f"model.{key}"), f"model.{key}", value, known[key])
    from huggingface_hub.errors import StrictDataclassError  # transformers' config classes raise it

    try:  # what the config class itself refuses (its own type and value checks), as one line
        # (token ids: the data's tokenizer sets ModernBERT's later; any valid id checks the rest)
        families.build_config(families.with_token_ids(model, {"pad": 0, "cls": 0, "sep": 0}))
    except (TypeError, ValueError, StrictDataclassError) as error:
        first_line = str(error).strip().splitlines()
        raise UsageError(f"{at('model')}: [model] is not a valid {family.config_class}: "
                         f"{' '.join(line.strip() for line in first_line[:2])}") from None
    return model


def _check_model(recipe: Recipe, at) -> None:
    """What BertConfig accepts but the model cannot be built (or trained) with: caught here, with
    the key named, instead of as a traceback from deep inside transformers."""
    from transformers.activations import ACT2FN

    fields = families.config_fields(families.family_of(recipe.model))  # what this family's config has
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
        if name not in fields:
            continue
        value = recipe.model_field(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{at('model.' + name)}: model.{name} = {value!r} must be an integer greater than 0")
    hidden, heads = recipe.model_field("hidden_size"), recipe.model_field("num_attention_heads")
    if hidden % heads:
        # name the --set that made them disagree, when one did
        origin = next((at(k) for k in ("model.num_attention_heads", "model.hidden_size") if at(k) != at("")),
                      at(""))
        raise UsageError(f"{origin}: model.hidden_size = {hidden} is not a multiple of "
                         f"model.num_attention_heads = {heads}; each head takes hidden_size / "
                         f"num_attention_heads dimensions (e.g. hidden_size = {heads * max(1, hidden // heads)})")
    hooks = families.family_of(recipe.model).hooks  # its own names for these kinds of field
    for name in hooks.ACTIVATION_FIELDS:
        activation = recipe.model_field(name)
        if isinstance(activation, str) and activation not in ACT2FN:
            raise UsageError(f"{at('model.' + name)}: model.{name} = {activation!r} is not valid; "
                             f"choose one of {_valid_list(ACT2FN)}")
    for name in hooks.DROPOUT_FIELDS:
        value = recipe.model_field(name)
        if isinstance(value, (int, float)) and not 0.0 <= value < 1.0:
            raise UsageError(f"{at('model.' + name)}: model.{name} = {value} must be in [0, 1)")
    for name in hooks.NORM_EPS_FIELDS:
        if recipe.model_field(name) <= 0:
            raise UsageError(f"{at('model.' + name)}: model.{name} = {recipe.model_field(name)} must be greater than 0")


def _check_ranges(recipe: Recipe, at) -> None:
    """Each field's own rule (declared with the field), then the rules that span two sections."""
    for section in _SECTION_CLASSES:
        config = getattr(recipe, section)
        for spec in dataclasses.fields(config):
            value, dotted = getattr(config, spec.name), f"{section}.{spec.name}"
            if "choices" in spec.metadata and value not in spec.metadata["choices"]:
                raise UsageError(f"{at(dotted)}: {dotted} = {value!r} is not valid; "
                                 f"choose one of {', '.join(spec.metadata['choices'])}")
            if "valid" in spec.metadata and not spec.metadata["valid"](value):
                raise UsageError(f"{at(dotted)}: {dotted} = {value} {spec.metadata['rule']}")
    if recipe.dist.autotune_log and not recipe.dist.autotune:
        raise UsageError(f"{at('dist.autotune_log')}: dist.autotune_log = {recipe.dist.autotune_log!r} logs the "
                         "autotuner's trials, and dist.autotune is false; set dist.autotune = true or drop it")
    optim = recipe.optim
    if optim.schedule == "wsd" and optim.warmup_proportion + optim.decay_proportion > 1.0:
        raise UsageError(f"{at('optim.decay_proportion')}: optim.warmup_proportion + optim.decay_proportion = "
                         f"{optim.warmup_proportion + optim.decay_proportion:g} exceeds 1; lower either")
    dist = recipe.dist
    if dist.fp16_allreduce and dist.compression not in ("none", "fp16"):
        raise UsageError(f"{at('dist.compression')}: dist.fp16_allreduce = true (fp16 on the wire) conflicts with "
                         f"dist.compression = {dist.compression}; drop dist.fp16_allreduce")
    if dist.compression == "powersgd" and recipe.train.precision == "fp16":
        # The loss scale changes (and overflowing steps are skipped): error buffers kept across steps
        # would mix gradients of different scales.
        raise UsageError(f"{at('dist.compression')}: dist.compression = powersgd does not run with "
                         "train.precision = fp16 (its loss scale changes under the error buffers); use "
                         "train.precision = bf16 or fp32")
    family = families.family_of(recipe.model)
    if recipe.data.format == "nsp" and not family.has_nsp:
        raise UsageError(f"{at('data.format')}: data.format = nsp needs a next-sentence head, which model.architecture = "
                         f"{family.name} does not have; use data.format = mlm (packed text)")
    data = recipe.data
    if data.max_predictions_per_seq > data.max_seq_len:
        # the masking cannot choose more tokens than a sequence has
        origin = next((at(k) for k in ("data.max_predictions_per_seq", "data.max_seq_len") if at(k) != at("")),
                      at(""))
        raise UsageError(f"{origin}: data.max_predictions_per_seq = {data.max_predictions_per_seq} exceeds "
                         f"data.max_seq_len = {data.max_seq_len}; set data.max_predictions_per_seq to at most "
                         f"{data.max_seq_len}, e.g. {predictions_for(data)} (data.mask_prob x data.max_seq_len, "
                         "rounded up)")
    positions = recipe.model_field("max_position_embeddings")
    if recipe.data.max_seq_len > positions:
        raise UsageError(
            f"{at('data.max_seq_len')}: data.max_seq_len = {recipe.data.max_seq_len} exceeds "
            f"model.max_position_embeddings = {positions}; raise model.max_position_embeddings"
        )


def recipe_warnings(recipe: Recipe) -> list[str]:
    """One line for each combination that runs but was measured to train worse than its neighbour
    (docs/compression.md): printed by pretrain (rank 0) and plan, refused by neither."""
    warnings = []
    if recipe.dist.compression == "powersgd" and recipe.optim.name == "adamw":
        warnings.append("hvdbert: warning: dist.compression = powersgd with optim.name = adamw stayed on BERT's "
                        "early loss plateau in 5 of 6 measured BERT-mini runs, uncompressed training in 2 "
                        "(docs/compression.md); with optim.name = lamb it trained within 0.02 of uncompressed")
    return warnings


def predictions_for(data: DataConfig) -> int:
    """The predictions cap a sequence length needs: mask_prob x max_seq_len, rounded up (the recipes'
    20 at 128 and 308 at 1024), in exact decimal arithmetic so 0.1 x 30 is 3, not 4."""
    return max(1, min(data.max_seq_len, math.ceil(Fraction(repr(data.mask_prob)) * data.max_seq_len)))


def pin_reference_batch(tree: dict) -> dict:
    """A recipe's rate belongs to the global batch its files state: unless they name another
    (optim.reference_global_batch_size), pin that one before `--set` can change the batch."""
    optim, batch = tree.setdefault("optim", {}), tree.get("batch", {})
    if isinstance(optim, dict) and isinstance(batch, dict) and "reference_global_batch_size" not in optim:
        written = batch["global_batch_size"] if "global_batch_size" in batch else BatchConfig.global_batch_size
        optim["reference_global_batch_size"] = written
    return tree


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, merge, override and validate a recipe file."""
    origins: dict[str, str] = {}
    tree = apply_overrides(pin_reference_batch(read_recipe_tree(Path(path))), list(overrides or []), origins)
    return recipe_from_tree(tree, str(path), origins)
