"""Pretrain BERT with Horovod.

    horovodrun -np N python -m hvdbert.pretrain --recipe RECIPE.toml [--data DATA_DIR] --output RUN_DIR
                                                [--set section.key=value ...] [--resume auto|CHECKPOINT_DIR]
                                                [--elastic] [--eval-data DIR]

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

from hvdbert import checkpoint
from hvdbert.agreement import check_agreement
from hvdbert.config import load_recipe
from hvdbert.dist import Distributed, init_distributed
from hvdbert.errors import ArgumentParser, UsageError, cli_entry, launcher_rank, rank_zero_decides
from hvdbert.evaluate import build_evaluator, summary_text
from hvdbert.metrics import NullMetrics, RunMetrics
from hvdbert.model import count_parameters
from hvdbert.run import Run, build_run, preflight, refuse_used_run_dir
from hvdbert.runlock import lock_run_dir
from hvdbert.train import TrainingDiverged, train

log = logging.getLogger("hvdbert")


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
    parser.add_argument("--eval-data", type=Path, metavar="DIR",
                        help="held-out data for [eval] (default: the --data directory's validation split)")
    return parser.parse_args(argv)


def setup_logging(dist: Distributed) -> None:
    # Rank 0 speaks; the others report only warnings and errors, prefixed with their rank.
    level = logging.INFO if dist.rank == 0 else logging.WARNING
    prefix = "" if dist.size == 1 else f"[rank {dist.rank}] "
    logging.basicConfig(level=level, format=f"{prefix}%(message)s", stream=sys.stderr, force=True)


def resolved_recipe(run: Run) -> dict:
    return {**run.recipe.to_dict(), "plan": run.plan.to_dict(), "data_dir": str(run.data.directory),
            "with_nsp": run.data.has_nsp, "tokenizer_sha256": run.data.manifest.tokenizer_sha256}


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
    refuse_used_run_dir(run_dir, resume_step is not None)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
        checkpoint.discard_later(run_dir, resume_step)
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


def restore_on_rank0(args, run: Run) -> str:
    """Rank 0 only: load `--resume` or `checkpoint.init_from` into the run's model, optimizer and state
    (the caller broadcasts). Every check happens here, before anything in the run directory is written."""
    recipe, model, optimizer, precision, state = run.recipe, run.model, run.optimizer, run.precision, run.state
    tokenizer = run.data.manifest.tokenizer_sha256
    if args.resume:
        if args.resume == "auto":
            candidates = [path for _, path in reversed(checkpoint.step_dirs(args.output))]
        else:
            candidates = [Path(args.resume)]
        refusals = []
        for path in candidates:
            try:
                found = checkpoint.open_checkpoint(path)
                checkpoint.check_compatible(found, recipe.model, tokenizer)
                checkpoint.restore_training(found, model, optimizer, precision.scaler)
            except checkpoint.CorruptCheckpoint as error:
                if args.resume != "auto":
                    raise
                log.warning("hvdbert: skipping checkpoint %s: %s", path, error)
                refusals.append(error)
                continue
            state.load_state_dict(found.state)
            precision.skipped_steps = int(found.state.get("scaler_skipped_steps", 0))
            return (f"resumed from {path}: step {state.step}, {state.samples_seen} samples seen "
                    f"(saved by {found.state['world_size']} workers)")
        if refusals:  # starting afresh would throw away the history those checkpoints stand for
            raise UsageError(f"--resume auto: none of the {len(refusals)} checkpoint(s) in "
                             f"{args.output / checkpoint.CHECKPOINTS} can be loaded (newest: {refusals[0]}); "
                             "nothing was changed: restore a good copy, or resume one explicitly with "
                             "--resume CHECKPOINT_DIR, or train afresh into a new --output")
        if not recipe.checkpoint.init_from:
            return "--resume auto: no checkpoint yet, starting from scratch"
    if recipe.checkpoint.init_from:
        source = checkpoint.open_checkpoint(Path(recipe.checkpoint.init_from))
        checkpoint.check_compatible(source, recipe.model, tokenizer, allow_longer_positions=True)
        checkpoint.load_weights(model, source.weights(), source.path, extend_positions=True)
        return f"weights from {source.path} (checkpoint.init_from); fresh optimizer and schedule"
    return "random initialisation"


def open_sample_log(run_dir: Path, enabled: bool, dist: Distributed):
    if not enabled:
        return None
    (run_dir / "sample_ids").mkdir(exist_ok=True)
    return open(run_dir / "sample_ids" / f"rank-{dist.rank}.txt", "a", encoding="utf-8", buffering=1)


@cli_entry("hvdbert.pretrain")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before Horovod starts: bad input fails fast, alike on every rank
        recipe = load_recipe(args.recipe, args.set)
        # Rank 0 checks the run directory for all (when it refuses, the launcher stops the others);
        # a worker that joins an elastic run later would find the run directory in use by its own job.
        if launcher_rank() == 0 and os.environ.get("HOROVOD_ELASTIC") != "1":
            preflight(recipe, args.output, args.data, args.resume)
    except UsageError:
        if launcher_rank() != 0:  # rank 0 alone says why
            raise SystemExit(2) from None
        raise
    if args.elastic and os.environ.get("HOROVOD_ELASTIC") != "1":  # set by horovodrun's elastic driver
        raise UsageError("--elastic needs Horovod elastic: launch with horovodrun --min-np N --max-np M "
                         "--host-discovery-script launch/discover_hosts.sh (Gloo; see docs/resume.md)")
    dist = init_distributed(recipe.dist)
    setup_logging(dist)
    run = build_run(recipe, args.data, dist)
    if run.plan.lr_warning and dist.rank == 0:
        log.warning(run.plan.lr_warning)
    evaluator = build_evaluator(args.eval_data, run)  # refuses before anything is written
    resolved = resolved_recipe(run)
    if evaluator is not None:
        resolved["eval_data_dir"] = str(evaluator.held_out.data.directory)

    check_agreement(dist, run.data, resolved, args.resume, args.output, recipe.checkpoint.init_from,
                    eval_data=evaluator.held_out.data if evaluator is not None else None)
    held = []  # rank 0's lock on the run directory, kept until the process exits

    def restore_and_prepare() -> str:
        held.append(lock_run_dir(args.output))  # before anything there is read: one run at a time
        outcome = restore_on_rank0(args, run)
        prepare_run_dir(args.output, resolved, run.state.step if args.resume else None,
                        dist.size if recipe.data.record_sample_ids else 0)
        return outcome

    log.info("hvdbert: %s", rank_zero_decides(dist.rank, lambda v: dist.broadcast_object(v, name="startup"),
                                              restore_and_prepare))
    run.broadcast_from_rank0()

    stop = checkpoint.StopRequest()
    stop.install()
    checkpointer = checkpoint.Checkpointer(run, args.output, resolved)
    plan = run.plan
    log.info("hvdbert: %d workers (%s), %s parameters, global batch %d = %d workers x %d micro x %d "
             "accumulation, %d steps, lr %s, data %s (%d sequences)", dist.size, dist.backend,
             f"{count_parameters(run.model):,}", plan.global_batch_size, plan.workers, plan.micro_batch_size,
             plan.accumulation_steps, plan.max_steps, plan.lr_derivation, run.data.directory, len(run.data))
    sample_log = open_sample_log(args.output, recipe.data.record_sample_ids, dist)
    try:
        if args.elastic:
            summary = run_elastic(run, args.output, checkpointer, stop, sample_log, evaluator)
        else:
            summary = train_once(run, args.output, checkpointer, stop, sample_log, evaluator=evaluator)
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
              f"final loss {summary['final_loss']:.4f}, training MLM accuracy {summary['final_mlm_accuracy']:.3f}, "
              f"mean {summary['mean_seq_per_s']:.1f} seq/s"
              f"{', ' + summary_text(summary['eval']) if summary.get('eval') else ''}{how}", flush=True)
    dist.shutdown()
    return 0


def train_once(run: Run, run_dir: Path, checkpointer, stop, sample_log, after_step=None, evaluator=None) -> dict:
    """Train from the run's position to the end of its plan, with a stream and metrics of its own."""
    run.open_stream()
    metrics = (RunMetrics(run_dir, run.state.step, run.plan.max_steps, run.recipe.train.progress_bar)
               if run.dist.rank == 0 else NullMetrics())
    try:
        return train(run, metrics, checkpointer, stop, sample_log, after_step, evaluator)
    finally:
        run.close_stream()
        metrics.close()


def run_elastic(run: Run, run_dir: Path, checkpointer, stop, sample_log, evaluator=None) -> dict:
    """Horovod elastic: workers may leave (and join) mid-run. The model, optimizer and progress
    counters are committed every elastic.commit_every steps; after a reset, the plan (accumulation,
    LR) is recomputed for the new worker count and the data stream restarts at the committed global
    sample position, so the global batch and the sample order are those of an uninterrupted run."""
    dist, state = run.dist, run.state

    def on_reset() -> None:  # Horovod calls this after re-forming the ring with the new workers
        plan = run.replan()
        log.warning("hvdbert: elastic reset: now %d workers, accumulation %d", dist.size, plan.accumulation_steps)

    def once(elastic_state) -> dict:
        state.load_state_dict({"step": elastic_state.step, "samples_seen": elastic_state.samples_seen})

        def commit(progress) -> None:
            if progress.step % run.recipe.elastic.commit_every == 0:
                elastic_state.step, elastic_state.samples_seen = progress.step, progress.samples_seen
                elastic_state.commit()  # Horovod: also where a host change is noticed

        return train_once(run, run_dir, checkpointer, stop, sample_log, after_step=commit, evaluator=evaluator)

    return dist.elastic_run(once, {"model": run.model, "optimizer": run.optimizer, "step": state.step,
                                   "samples_seen": state.samples_seen}, on_reset)


if __name__ == "__main__":
    sys.exit(main())
