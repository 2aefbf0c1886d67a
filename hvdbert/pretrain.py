"""Pretrain BERT with Horovod.

    horovodrun -np N python -m hvdbert.pretrain --recipe RECIPE.toml [--data DATA_DIR] --output RUN_DIR
                                                [--set section.key=value ...]

Runs under horovodrun (Gloo or MPI), under mpirun, or as one plain process. With no --data, the
embedded default corpus is prepared once (tokenizer trained on it) and cached.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from hvdbert.config import Recipe, load_recipe
from hvdbert.data.loader import BatchStream, StreamLayout
from hvdbert.data.masking import MaskingRule
from hvdbert.data.shards import PreparedData
from hvdbert.dist import SingleProcess, init_distributed
from hvdbert.errors import ArgumentParser, UsageError, cli_entry
from hvdbert.metrics import NullMetrics, RunMetrics
from hvdbert.model import build_model, count_parameters
from hvdbert.optim import build_optimizer, init_state
from hvdbert.plan import Plan, make_plan
from hvdbert.prepare import builtin_cache_dir, prepare_builtin
from hvdbert.train import Precision, TrainState, train

log = logging.getLogger("hvdbert")


def cache_root() -> Path:
    return Path(os.environ.get("HVDBERT_CACHE", Path.home() / ".cache" / "hvdbert"))


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m hvdbert.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe TOML file (see recipes/)")
    parser.add_argument("--data", type=Path, help="prepared data directory (default: embedded corpus)")
    parser.add_argument("--output", required=True, type=Path, help="run directory")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key (repeatable)")
    return parser.parse_args(argv)


def setup_logging(dist: SingleProcess) -> None:
    # Rank 0 speaks; the others report only warnings and errors, prefixed with their rank.
    level = logging.INFO if dist.rank == 0 else logging.WARNING
    prefix = "" if dist.size == 1 else f"[rank {dist.rank}] "
    logging.basicConfig(level=level, format=f"{prefix}%(message)s", stream=sys.stderr, force=True)


def choose_device(dist: SingleProcess, precision: str) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    if precision == "fp16":
        raise UsageError("train.precision = fp16 needs a CUDA GPU and none is available; "
                         "use train.precision = bf16 or fp32 on CPU")
    return torch.device("cpu")


def open_data(data_dir: Path | None, recipe: Recipe, dist: SingleProcess) -> PreparedData:
    if data_dir is None:
        vocab_size = recipe.model.get("vocab_size", 30522)
        directory = builtin_cache_dir(cache_root() / "data", vocab_size, recipe.data.max_seq_len,
                                      recipe.data.builtin_max_documents)
        if dist.local_rank == 0:  # one preparer per host; the others wait for it
            prepare_builtin(directory, vocab_size, recipe.data.max_seq_len, recipe.data.builtin_max_documents)
        dist.barrier()
        data_dir = directory
    data = PreparedData(data_dir)
    manifest = data.manifest
    if manifest.seq_len != recipe.data.max_seq_len:
        raise UsageError(
            f"{data_dir}: prepared with sequence length {manifest.seq_len}, but the recipe has "
            f"data.max_seq_len = {recipe.data.max_seq_len}; prepare with --seq-len "
            f"{recipe.data.max_seq_len} or pass --set data.max_seq_len={manifest.seq_len}"
        )
    vocab_size = recipe.model.get("vocab_size", 30522)
    if manifest.vocab_size > vocab_size:
        raise UsageError(
            f"{data_dir}: the tokenizer has {manifest.vocab_size} tokens but model.vocab_size = "
            f"{vocab_size}; set model.vocab_size to at least {manifest.vocab_size}"
        )
    return data


def prepare_run_dir(run_dir: Path, recipe: Recipe, plan: Plan, data: PreparedData) -> None:
    if (run_dir / "metrics.jsonl").exists():
        raise UsageError(f"{run_dir} already holds a run (metrics.jsonl); choose a new --output")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**recipe.to_dict(), "plan": plan.to_dict(), "data_dir": str(data.directory)}
    (run_dir / "recipe.json").write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")


@cli_entry("hvdbert.pretrain")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)  # before Horovod starts: bad recipes fail fast
    dist = init_distributed(recipe.dist)
    setup_logging(dist)
    plan = make_plan(recipe, dist.size)
    device = choose_device(dist, recipe.train.precision)
    if device.type == "cpu":
        torch.set_num_threads(recipe.dist.threads_per_worker)  # one rank per core by default

    data = open_data(args.data, recipe, dist)
    if dist.rank == 0:
        prepare_run_dir(args.output, recipe, plan, data)
    dist.barrier()  # the run directory exists (or rank 0 failed) before anyone writes to it

    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, with_nsp=data.has_nsp).to(device)
    optimizer = dist.wrap_optimizer(build_optimizer(model, recipe.optim, plan), model,
                                    plan.accumulation_steps, recipe.dist.fp16_allreduce)
    init_state(optimizer)  # Horovod's wrapper is a new optimizer object: create its state here
    dist.broadcast_model_and_optimizer(model, optimizer)

    state = TrainState()
    special = data.manifest.special_token_ids
    rule = MaskingRule(
        mask_prob=recipe.data.mask_prob, max_predictions=recipe.data.max_predictions_per_seq,
        mask_id=special["mask"], vocab_size=data.manifest.vocab_size,
        special_ids=(special["pad"], special["cls"], special["sep"]),
    )
    layout = StreamLayout(dist.size, dist.rank, plan.micro_batch_size, plan.accumulation_steps)
    stream = BatchStream(data, layout, rule, recipe.train.seed, state.samples_seen,
                         recipe.data.prefetch_batches, pin_memory=device.type == "cuda")
    metrics = (RunMetrics(args.output, state.step, plan.max_steps, recipe.train.progress_bar)
               if dist.rank == 0 else NullMetrics())
    log.info("hvdbert: %d workers (%s), %s parameters, global batch %d = %d workers x %d micro x %d "
             "accumulation, %d steps, data %s (%d sequences)", dist.size, dist.backend,
             f"{count_parameters(model):,}", plan.global_batch_size, plan.workers, plan.micro_batch_size,
             plan.accumulation_steps, plan.max_steps, data.directory, len(data))
    try:
        summary = train(model, optimizer, stream, plan, state, dist, Precision.create(recipe.train.precision, device),
                        recipe.train.grad_clip_norm, recipe.train.log_every, metrics)
    finally:
        stream.close()
        metrics.close()
    if dist.rank == 0:
        print(f"hvdbert: done: {summary['steps']} steps, {summary['samples_seen']} samples seen, "
              f"final loss {summary['final_loss']:.4f}, mean {summary['mean_seq_per_s']:.1f} seq/s",
              flush=True)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
