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

if __name__ == "__main__":  # the program: a Ctrl-C while torch imports is one line, not a traceback
    from hvdbert.errors import quiet_interrupts

    quiet_interrupts("hvdbert.pretrain")

import logging
import os
import socket
import sys
from pathlib import Path

from hvdbert import checkpoint
from hvdbert.agreement import check_agreement
from hvdbert.config import load_recipe
from hvdbert.dist import init_distributed
from hvdbert.errors import UsageError, cli_entry, rank_zero_decides
from hvdbert.evaluate import build_evaluator, summary_text
from hvdbert.hooks import StepHook
from hvdbert.launcher import elastic_launch, launcher_rank
from hvdbert.metrics import setup_logging
from hvdbert.model import count_parameters
from hvdbert.plan import run_warnings
from hvdbert.preflight import preflight, pretrain_parser
from hvdbert.run import Run, build_run
from hvdbert.rundir import cut_sample_logs, open_sample_log, prepare_run_dir, resolved_recipe, train_once
from hvdbert.runlock import LOCK_FILE, RankZeroLock
from hvdbert.train import TrainingDiverged

log = logging.getLogger("hvdbert")


def parse_args(argv: list[str] | None):
    return pretrain_parser().parse_args(argv)  # the launchers' pre-flight reads them with it too


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
                checkpoint.restore_training(found, model, optimizer, precision.scaler, run.compressor)
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


@cli_entry("hvdbert.pretrain")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:  # before Horovod starts: bad input fails fast, alike on every rank
        recipe = load_recipe(args.recipe, args.set)
        if args.elastic and recipe.dist.wire_compression in ("bf16", "powersgd"):
            # Horovod elastic re-forms the job around its DistributedOptimizer; hvdbert's own
            # compression (and PowerSGD's per-worker errors) does not follow a resize.
            raise UsageError(f"--elastic does not run with dist.compression = {recipe.dist.wire_compression}; "
                             "use dist.compression = none or fp16 under --elastic")
        if args.elastic and recipe.dist.bucket_mb > 0:
            # Horovod elastic re-forms the job around its own DistributedOptimizer; hvdbert's buckets
            # have not been tried through a resize.
            raise UsageError(f"--elastic does not run with dist.bucket_mb = {recipe.dist.bucket_mb:g}; "
                             "use dist.bucket_mb = 0 (Horovod's per-tensor allreduces) under --elastic")
        # Rank 0 checks the run directory for all (when it refuses, the launcher stops the others).
        # Under elastic a worker that joins later would find the run directory in use by its own job,
        # and nothing here tells it from the first workers: they run it in start() instead.
        if launcher_rank() == 0 and not elastic_launch():
            preflight(recipe, args.output, args.data, args.resume, args.eval_data)
        if elastic_launch() and not args.elastic:
            raise UsageError("started by horovodrun's elastic driver (--host-discovery-script) without "
                             "--elastic: add --elastic to the hvdbert.pretrain arguments (launch/multinode.sh "
                             "--elastic adds it)")
    except UsageError:
        if launcher_rank() != 0:  # rank 0 alone says why
            raise SystemExit(2) from None
        raise
    if args.elastic and not elastic_launch():
        raise UsageError("--elastic needs Horovod elastic: launch with horovodrun --min-np N --max-np M "
                         "--host-discovery-script launch/discover_hosts.sh (Gloo; see docs/resume.md)")
    dist = init_distributed(recipe.dist)
    setup_logging(dist)
    # Under elastic nothing from here to the elastic loop is a collective: a worker that joins a
    # running job meets the others only at the loop's state sync (dist.Distributed.elastic).
    run = build_run(recipe, args.data, dist)
    if dist.rank == 0:
        for warning in run_warnings(recipe, run.plan):
            log.warning(warning)
    evaluator = build_evaluator(args.eval_data, run)  # refuses before anything is written
    eval_data = evaluator.held_out.data if evaluator is not None else None

    def resolved() -> dict:  # for the run's current worker count (an elastic reset changes it)
        found = resolved_recipe(run)
        if eval_data is not None:
            found["eval_data_dir"] = str(eval_data.directory)
        return found

    def agree() -> None:
        check_agreement(dist, run.data, resolved(), args.resume, args.output, recipe.checkpoint.init_from,
                        eval_data=eval_data)

    lock = RankZeroLock(args.output)  # rank 0's lock on the run directory, kept until the process exits

    def start() -> None:
        """Rank 0 locks the run directory, restores (or keeps the random start) and prepares it;
        then every rank takes rank 0's state. Every rank calls it at the same point."""
        def restore_and_prepare() -> str:
            # Under elastic, by the job's first workers (main() could not tell them from joiners); not
            # again when a worker lost before the first commit brings them back here, lock in hand.
            if args.elastic and not lock.held:
                preflight(recipe, args.output, args.data, args.resume, args.eval_data)
            lock.take()  # before anything there is read: one run at a time
            try:
                outcome = restore_on_rank0(args, run)
                prepare_run_dir(args.output, resolved(), run.state.step if args.resume else None,
                                dist.size if recipe.data.record_sample_ids else 0)
            except UsageError:
                lock.abandon()  # refused: no run directory or lock file left behind that was not there
                raise
            return outcome

        log.info("hvdbert: %s", rank_zero_decides(dist.rank, lambda v: dist.broadcast_object(v, name="startup"),
                                                  restore_and_prepare))
        run.broadcast_from_rank0()
        plan = run.plan
        log.info("hvdbert: %d workers (%s), %s parameters, global batch %d = %d workers x %d micro x %d "
                 "accumulation, %d steps, lr %s, data %s (%d sequences)", dist.size, dist.backend,
                 f"{count_parameters(run.model):,}", plan.global_batch_size, plan.workers, plan.micro_batch_size,
                 plan.accumulation_steps, plan.max_steps, plan.lr_derivation, run.data.directory, len(run.data))

    stop = checkpoint.StopRequest()  # installed when training is about to start
    checkpointer = checkpoint.Checkpointer(run, args.output, resolved(), lock)
    try:
        if args.elastic:
            stop.install()
            summary = run_elastic(run, args.output, checkpointer, stop, evaluator, agree, start, lock)
        else:
            agree()
            start()
            stop.install()
            sample_log = open_sample_log(args.output, recipe.data.record_sample_ids, dist)
            try:
                hooks = [hook for hook in (sample_log, evaluator, checkpointer) if hook is not None]
                summary = train_once(run, args.output, hooks, stop)
            finally:
                if sample_log is not None:
                    sample_log.close()
    except TrainingDiverged as error:
        if dist.rank == 0:
            print(f"hvdbert.pretrain: error: {error}", file=sys.stderr, flush=True)
        return 3
    finally:
        lock.release()  # the run is over: a caller that goes on (main() called in-process) may reopen it
    if dist.rank == 0:
        how = f" (stopped by {summary['stopped_by']}; continue with --resume auto)" if summary["stopped_by"] else ""
        print(f"hvdbert: done: {summary['steps']} steps, {summary['samples_seen']} samples seen, "
              f"final loss {summary['final_loss']:.4f}, training MLM accuracy {summary['final_mlm_accuracy']:.3f}, "
              f"mean {summary['mean_seq_per_s']:.1f} seq/s"
              f"{', ' + summary_text(summary['eval']) if summary.get('eval') else ''}{how}", flush=True)
    dist.shutdown()
    return 0


class ElasticCommit(StepHook):
    """Commits the elastic state every `every_steps` steps: what a lost worker rolls the job back to."""

    def __init__(self, elastic_state, every_steps: int):
        self.elastic_state = elastic_state
        self.every_steps = every_steps

    def step_end(self, run: Run) -> None:
        if run.state.step % self.every_steps == 0:
            self.elastic_state.step, self.elastic_state.samples_seen = run.state.step, run.state.samples_seen
            self.elastic_state.commit()  # Horovod: also where a host change is noticed


def run_elastic(run: Run, run_dir: Path, checkpointer, stop, evaluator, agree, start, lock: RankZeroLock) -> dict:
    """Horovod elastic: workers may leave and join mid-run. The model, optimizer and progress
    counters are committed every elastic.commit_every steps; after a reset, the plan (accumulation,
    LR) is recomputed for the new worker count and the data stream restarts at the committed global
    sample position, so the global batch and the sample order are those of an uninterrupted run.

    A worker that joins runs no start-up collective of its own: every worker checks its agreement
    with rank 0 (`agree`) right before each state sync, the job's first workers then run `start`
    once (rank 0 restores, every rank takes its state), and after every reset rank 0, whichever
    process it is now, holds the run directory's lock."""
    dist, state, recipe = run.dist, run.state, run.recipe

    def on_reset() -> None:  # Horovod calls this after re-forming the ring with the new workers
        setup_logging(dist)  # this worker's rank may have changed: rank 0 speaks, the others prefix theirs
        try:
            plan = run.replan()
        except UsageError as refusal:  # every worker reaches it; rank 0 alone says why
            if dist.rank != 0:
                raise SystemExit(2) from None
            raise UsageError(f"the elastic job now has {dist.size} workers: {refusal}; offer hosts whose slots add "
                             "up to counts that work (--max-np caps the count), then continue with --resume "
                             "auto") from None
        log.warning("hvdbert: elastic reset: now %d workers, accumulation %d", dist.size, plan.accumulation_steps)

    def once(elastic_state) -> dict:
        if not elastic_state.started:  # the job's first workers, before their first step
            start()
            elastic_state.step, elastic_state.samples_seen = state.step, state.samples_seen
            elastic_state.started = True
            elastic_state.commit()  # a rollback returns to the restored start, not to the random one
        else:
            state.load_state_dict({"step": elastic_state.step, "samples_seen": elastic_state.samples_seen})
            if dist.rank != 0:
                lock.release()
            had_lock = lock.held
            rank_zero_decides(dist.rank, lambda v: dist.broadcast_object(v, name="run_lock"),
                              lambda: lock.take(recipe.elastic.lock_wait_seconds))
            if dist.rank == 0 and not had_lock:
                log.info("hvdbert: rank 0 is now pid %d on %s; it holds %s", os.getpid(), socket.gethostname(),
                         run_dir / LOCK_FILE)
            if dist.rank == 0:  # under the lock: the previous rank 0 may have been saving until now
                # Checkpoints after the commit (one written when commit_every does not divide
                # checkpoint.every_steps) hold the lost steps; the redone steps write their own.
                checkpoint.discard_later(run_dir, state.step, "the elastic rollback to the last commit")
        if recipe.data.record_sample_ids:
            # Steps after the last commit are done again: the logs are cut back to it, so that they
            # hold the history that counts (line k: step k + 1), as after a resume.
            if dist.rank == 0:
                cut_sample_logs(run_dir, state.step, dist.size)
            dist.barrier()
        sample_log = open_sample_log(run_dir, recipe.data.record_sample_ids, dist)
        commit = ElasticCommit(elastic_state, recipe.elastic.commit_every)  # last: it may leave the loop
        try:
            hooks = [hook for hook in (sample_log, evaluator, checkpointer, commit) if hook is not None]
            return train_once(run, run_dir, hooks, stop)
        finally:
            if sample_log is not None:
                sample_log.close()

    return dist.elastic_run(once, {"model": run.model, "optimizer": run.optimizer, "step": state.step,
                                   "samples_seen": state.samples_seen, "started": False},
                            on_reset, before_sync=agree)


if __name__ == "__main__":
    sys.exit(main())
