"""Pretrain BERT with Horovod.

    horovodrun -np N python -m hvdbert.pretrain --recipe RECIPE.toml [--data DATA_DIR] --output RUN_DIR
                                                [--set section.key=value ...] [--resume auto|CHECKPOINT_DIR]
                                                [--elastic]

Runs under horovodrun (Gloo or MPI), under mpirun, or as one plain process. With no --data, the
embedded default corpus is prepared once (tokenizer trained on it) and cached. Checkpoints go to
RUN_DIR/checkpoints/step-<N>/; SIGTERM/SIGINT save one and exit 0; --resume auto continues, on any
worker count; --elastic runs under Horovod elastic (docs/resume.md).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch

from hvdbert import checkpoint
from hvdbert.config import Recipe, load_recipe
from hvdbert.data.loader import BatchStream, StreamLayout
from hvdbert.data.masking import MaskingRule
from hvdbert.data.shards import PreparedData
from hvdbert.data.tokenizer import tokenizer_hash
from hvdbert.dist import SingleProcess, init_distributed
from hvdbert.errors import ArgumentParser, UsageError, cli_entry
from hvdbert.metrics import NullMetrics, RunMetrics
from hvdbert.model import build_model, compile_model, count_parameters
from hvdbert.optim import build_optimizer, init_state
from hvdbert.plan import Plan, make_plan
from hvdbert.prepare import builtin_cache_dir, prepare_builtin
from hvdbert.train import Precision, TrainingDiverged, TrainState, train

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
    parser.add_argument("--resume", metavar="auto|CHECKPOINT_DIR",
                        help="continue from the newest complete checkpoint in --output (auto; none yet: "
                             "start from scratch) or from the given checkpoint directory")
    parser.add_argument("--elastic", action="store_true",
                        help="Horovod elastic training (horovodrun --min-np/--max-np --host-discovery-script)")
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
    if not Precision.supported(precision, "cpu"):
        raise UsageError(f"train.precision = {precision} needs a CUDA GPU, or a torch whose CPU autocast "
                         f"supports it (this is torch {torch.__version__}); use train.precision = fp32")
    return torch.device("cpu")


def open_data(data_dir: Path | None, recipe: Recipe, dist: SingleProcess) -> PreparedData:
    vocab_size = recipe.model_field("vocab_size")
    if data_dir is None:
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
    if manifest.format != recipe.data.format:
        raise UsageError(
            f"{data_dir}: prepared in format {manifest.format}, but the recipe has data.format = "
            f"{recipe.data.format}; prepare with --format {recipe.data.format} or pass "
            f"--set data.format={manifest.format}"
        )
    if manifest.vocab_size > vocab_size:
        raise UsageError(
            f"{data_dir}: the tokenizer has {manifest.vocab_size} tokens but model.vocab_size = "
            f"{vocab_size}; set model.vocab_size to at least {manifest.vocab_size}"
        )
    # The tokenizer stored with the data is the one the sequences were made with (and the one export
    # ships): it must be the one the manifest names.
    stored = tokenizer_hash(data.tokenizer_dir)
    if stored != manifest.tokenizer_sha256:
        raise UsageError(
            f"{data.tokenizer_dir}: this tokenizer (sha256 {stored[:12]}) is not the one the data was "
            f"prepared with ({manifest.tokenizer_sha256[:12]} in manifest.json); prepare the data again"
        )
    return data


def open_stream(data: PreparedData, recipe: Recipe, plan: Plan, dist: SingleProcess, start_position: int,
                device: torch.device) -> BatchStream:
    """This worker's batches from global sample position `start_position` on, for `plan`'s layout."""
    special = data.manifest.special_token_ids
    rule = MaskingRule(
        mask_prob=recipe.data.mask_prob, max_predictions=recipe.data.max_predictions_per_seq,
        mask_id=special["mask"], vocab_size=data.manifest.vocab_size,
        special_ids=(special["pad"], special["cls"], special["sep"]),
        whole_word=recipe.data.whole_word_masking,
    )
    layout = StreamLayout(dist.size, dist.rank, plan.micro_batch_size, plan.accumulation_steps)
    return BatchStream(data, layout, rule, recipe.train.seed, start_position,
                       recipe.data.prefetch_batches, pin_memory=device.type == "cuda")


def resolved_recipe(recipe: Recipe, plan: Plan, data: PreparedData) -> dict:
    return {**recipe.to_dict(), "plan": plan.to_dict(), "data_dir": str(data.directory), "with_nsp": data.has_nsp}


def _rewrite_lines(path: Path, edit) -> None:
    """Replace the lines of `path` (none if missing) by edit(lines), atomically. A resumed run drops
    what was logged after its checkpoint, so the files read as if the run had never stopped."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.is_file() else []
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(edit(lines)), encoding="utf-8")
    os.replace(temporary, path)


def prepare_run_dir(run_dir: Path, resolved: dict, resume_step: int | None, sample_log_ranks: int) -> None:
    """A fresh run refuses a used directory; a resumed one (resume_step: its checkpoint's step, 0 when
    `--resume auto` found none) keeps metrics.jsonl and the sample-id logs up to that step."""
    if resume_step is None and (run_dir / "metrics.jsonl").exists():
        raise UsageError(f"{run_dir} already holds a run (metrics.jsonl); choose a new --output "
                         "or continue it with --resume auto")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
        _rewrite_lines(run_dir / "metrics.jsonl",
                       lambda lines: [line for line in lines if json.loads(line)["step"] <= resume_step])
        # Line k of rank-<r>.txt is step k + 1: a rank that did not exist before the resume (another
        # worker count) gets empty lines for the steps it did not run.
        logs = set((run_dir / "sample_ids").glob("rank-*.txt"))
        logs |= {run_dir / "sample_ids" / f"rank-{r}.txt" for r in range(sample_log_ranks)}
        if sample_log_ranks:
            (run_dir / "sample_ids").mkdir(exist_ok=True)
        for sample_log in logs:
            _rewrite_lines(sample_log, lambda lines: lines[:resume_step] + ["\n"] * (resume_step - len(lines)))
    temporary = run_dir / "recipe.json.tmp"
    temporary.write_text(json.dumps(resolved, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, run_dir / "recipe.json")


def restore_on_rank0(args, recipe: Recipe, data: PreparedData, model, optimizer, precision: Precision,
                     state: TrainState) -> str:
    """Rank 0 only: load `--resume` or `checkpoint.init_from` into model/optimizer/state (the caller
    broadcasts). Every check happens here, before anything in the run directory is written."""
    tokenizer = data.manifest.tokenizer_sha256
    if args.resume:
        if args.resume == "auto":
            candidates = [path for _, path in reversed(checkpoint.step_dirs(args.output))]
        else:
            candidates = [Path(args.resume)]
        for path in candidates:
            try:
                found = checkpoint.open_checkpoint(path)
                checkpoint.check_compatible(found, recipe.model, tokenizer)
                checkpoint.restore_training(found, model, optimizer, precision.scaler)
            except checkpoint.CorruptCheckpoint as error:
                if args.resume != "auto":
                    raise
                log.warning("hvdbert: skipping checkpoint %s: %s", path, error)
                continue
            state.load_state_dict(found.state)
            precision.skipped_steps = int(found.state.get("scaler_skipped_steps", 0))
            return (f"resumed from {path}: step {state.step}, {state.samples_seen} samples seen "
                    f"(saved by {found.state['world_size']} workers)")
        if not recipe.checkpoint.init_from:
            return "--resume auto: no checkpoint yet, starting from scratch"
    if recipe.checkpoint.init_from:
        source = checkpoint.open_checkpoint(Path(recipe.checkpoint.init_from))
        checkpoint.check_compatible(source, recipe.model, tokenizer, allow_longer_positions=True)
        checkpoint.load_weights(model, source.weights(), source.path, extend_positions=True)
        return f"weights from {source.path} (checkpoint.init_from); fresh optimizer and schedule"
    return "random initialisation"


def agreed(dist: SingleProcess, action) -> str:
    """Run `action` on rank 0; if it refuses (UsageError), every rank stops: rank 0 reports the
    one-line error, the others exit with the same status quietly (none is left waiting)."""
    outcome, error = "", None
    if dist.rank == 0:
        try:
            outcome = action()
        except UsageError as refusal:
            error = refusal
    failed = dist.broadcast_object(error is not None, name="startup_failed")
    if error is not None:
        raise error
    if failed:
        raise SystemExit(2)
    return outcome


def open_sample_log(run_dir: Path, enabled: bool, dist: SingleProcess):
    if not enabled:
        return None
    (run_dir / "sample_ids").mkdir(exist_ok=True)
    return open(run_dir / "sample_ids" / f"rank-{dist.rank}.txt", "a", encoding="utf-8", buffering=1)


@cli_entry("hvdbert.pretrain")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)  # before Horovod starts: bad recipes fail fast
    if args.elastic and os.environ.get("HOROVOD_ELASTIC") != "1":  # set by horovodrun's elastic driver
        raise UsageError("--elastic needs Horovod elastic: launch with horovodrun --min-np N --max-np M "
                         "--host-discovery-script launch/discover_hosts.sh (Gloo; see docs/resume.md)")
    dist = init_distributed(recipe.dist)
    setup_logging(dist)
    plan = make_plan(recipe, dist.size)
    device = choose_device(dist, recipe.train.precision)
    if device.type == "cpu":
        torch.set_num_threads(recipe.dist.threads_per_worker)  # one rank per core by default
    data = open_data(args.data, recipe, dist)

    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, with_nsp=data.has_nsp).to(device)
    if recipe.train.compile:
        compile_model(model)
    optimizer = dist.wrap_optimizer(build_optimizer(model, recipe.optim, plan), model,
                                    plan.accumulation_steps, recipe.dist.fp16_allreduce)
    init_state(optimizer)  # Horovod's wrapper is a new optimizer object: create its state here
    precision = Precision.create(recipe.train.precision, device)
    state = TrainState()
    resolved = resolved_recipe(recipe, plan, data)

    def restore_and_prepare() -> str:
        outcome = restore_on_rank0(args, recipe, data, model, optimizer, precision, state)
        prepare_run_dir(args.output, resolved, state.step if args.resume else None,
                        dist.size if recipe.data.record_sample_ids else 0)
        return outcome

    log.info("hvdbert: %s", agreed(dist, restore_and_prepare))
    # Horovod: rank 0 read the checkpoint (or initialised at random); everyone starts from its state.
    state.load_state_dict(dist.broadcast_object(state.state_dict(), name="train_state"))
    dist.broadcast_model_and_optimizer(model, optimizer)
    if precision.scaler is not None:
        precision.scaler.load_state_dict(dist.broadcast_object(precision.scaler.state_dict(), name="scaler"))

    stop = checkpoint.StopRequest()
    stop.install()
    checkpointer = checkpoint.Checkpointer(args.output, recipe.checkpoint.every_steps, recipe.checkpoint.keep,
                                           dist, model, optimizer, precision, resolved,
                                           data.manifest.tokenizer_sha256)
    log.info("hvdbert: %d workers (%s), %s parameters, global batch %d = %d workers x %d micro x %d "
             "accumulation, %d steps, data %s (%d sequences)", dist.size, dist.backend,
             f"{count_parameters(model):,}", plan.global_batch_size, plan.workers, plan.micro_batch_size,
             plan.accumulation_steps, plan.max_steps, data.directory, len(data))
    sample_log = open_sample_log(args.output, recipe.data.record_sample_ids, dist)
    try:
        if args.elastic:
            summary = run_elastic(recipe, data, plan, dist, device, model, optimizer, precision, state,
                                  args.output, checkpointer, stop, sample_log)
        else:
            stream = open_stream(data, recipe, plan, dist, state.samples_seen, device)
            metrics = (RunMetrics(args.output, state.step, plan.max_steps, recipe.train.progress_bar)
                       if dist.rank == 0 else NullMetrics())
            try:
                summary = train(model, optimizer, stream, plan, state, dist, precision, recipe.train, metrics,
                                checkpointer, stop, sample_log)
            finally:
                stream.close()
                metrics.close()
    except TrainingDiverged as error:
        if dist.rank == 0:
            print(f"hvdbert.pretrain: error: {error}", file=sys.stderr, flush=True)
        return 3
    finally:
        if sample_log is not None:
            sample_log.close()
    if dist.rank == 0:
        how = f" (stopped by {summary['stopped_by']}; continue with --resume auto)" if summary["stopped_by"] else ""
        print(f"hvdbert: done: {summary['steps']} steps, {summary['samples_seen']} samples seen, "
              f"final loss {summary['final_loss']:.4f}, mean {summary['mean_seq_per_s']:.1f} seq/s{how}",
              flush=True)
    dist.shutdown()
    return 0


def run_elastic(recipe: Recipe, data: PreparedData, plan: Plan, dist: SingleProcess, device: torch.device,
                model, optimizer, precision: Precision, state: TrainState, run_dir: Path, checkpointer,
                stop, sample_log) -> dict:
    """Horovod elastic: workers may leave (and join) mid-run. The model, optimizer and progress
    counters are committed every elastic.commit_every steps; after a reset, the plan (accumulation,
    LR) is recomputed for the new worker count and the data stream restarts at the committed global
    sample position, so the global batch and the sample order are those of an uninterrupted run."""
    current = {"plan": plan}

    def on_reset() -> None:  # Horovod calls this after re-forming the ring with the new workers
        current["plan"] = new_plan = make_plan(recipe, dist.size)
        dist.set_accumulation_steps(optimizer, new_plan.accumulation_steps)
        checkpointer.resolved_recipe = {**checkpointer.resolved_recipe, "plan": new_plan.to_dict()}
        log.warning("hvdbert: elastic reset: now %d workers, accumulation %d", dist.size,
                    new_plan.accumulation_steps)

    def run(elastic_state) -> dict:
        state.load_state_dict({"step": elastic_state.step, "samples_seen": elastic_state.samples_seen})
        plan = current["plan"]
        stream = open_stream(data, recipe, plan, dist, state.samples_seen, device)
        metrics = (RunMetrics(run_dir, state.step, plan.max_steps, recipe.train.progress_bar)
                   if dist.rank == 0 else NullMetrics())

        def commit(progress: TrainState) -> None:
            if progress.step % recipe.elastic.commit_every == 0:
                elastic_state.step, elastic_state.samples_seen = progress.step, progress.samples_seen
                elastic_state.commit()  # Horovod: also where a host change is noticed

        try:
            return train(model, optimizer, stream, plan, state, dist, precision, recipe.train, metrics,
                         checkpointer, stop, sample_log, after_step=commit)
        finally:
            stream.close()
            metrics.close()

    return dist.elastic_run(run, {"model": model, "optimizer": optimizer, "step": state.step,
                                  "samples_seen": state.samples_seen}, on_reset)


if __name__ == "__main__":
    sys.exit(main())
