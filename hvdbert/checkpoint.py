"""Checkpoints: atomic writes, safe reads, resume and phase-2 initialisation.

    RUN_DIR/checkpoints/step-<N>/
        model.safetensors   weights, BertForPreTraining's names (tied tensors stored once)
        training.pt         optimizer and GradScaler state (read with weights_only=True)
        recipe.json         the fully resolved recipe and plan the run was trained with
        state.json          step, samples seen (= data position), world size, tokenizer hash,
                            and the sha256 of every file above; written last

Rank 0 writes into `checkpoints/.step-<N>.partial-<host>-<pid>/`, fsyncs every file and the
directory, then renames it to `step-<N>`: a directory named `step-<N>` is always complete. An existing
`step-<N>` (damaged, or of a history a resume replaced) is replaced, never kept in place of the new one. A reader still checks the
sha256 sums, so a checkpoint damaged later (a truncated copy, a full disk on another tool's side) is
skipped by `--resume auto` with a warning rather than loaded. Nothing here unpickles code: weights are
safetensors and the rest goes through `torch.load(weights_only=True)`, which refuses any pickle that
would call a function other than torch's tensor rebuilders.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hvdbert import families
from hvdbert.errors import UsageError
from hvdbert.files import file_sha256, fsync_path, write_failure
from hvdbert.hooks import StepHook

# torch and safetensors are imported where tensors are handled: the launchers' pre-flight
# (`hvdbert.plan --output`, before any worker starts) reads only checkpoints' state files, and stays
# a fraction of a second instead of the seconds torch's import takes.
if TYPE_CHECKING:
    import torch

log = logging.getLogger("hvdbert")

FORMAT_VERSION = 1
CHECKPOINTS = "checkpoints"
STEP_DIR = re.compile(r"^step-(\d+)$")
WEIGHTS, TRAINING, RECIPE, STATE = "model.safetensors", "training.pt", "recipe.json", "state.json"
POSITION_EMBEDDINGS = "bert.embeddings.position_embeddings.weight"
WORD_EMBEDDINGS = "bert.embeddings.word_embeddings.weight"


class CorruptCheckpoint(UsageError):
    """A checkpoint directory that cannot be trusted: missing files, wrong sums, unsafe pickles."""


# ------------------------------------------------------------------------------------------------
# Writing


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each storage once: BertForPreTraining ties the MLM decoder to the word
    embeddings, and safetensors refuses to store two names for one tensor."""
    weights, seen = {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape)
        if key in seen:
            continue
        seen.add(key)
        weights[name] = tensor.detach().to("cpu").contiguous()
    return weights


def _scratch_name(directory: Path, kind: str) -> Path:
    """A hidden sibling of `directory` that names its writer: `.step-<N>.<kind>-<host>-<pid>`. The
    host and pid let prune() tell a dead writer's leftovers from a live writer's work in progress."""
    return directory.parent / f".{directory.name}.{kind}-{socket.gethostname()}-{os.getpid()}"


def write_checkpoint(directory: Path, model, optimizer, scaler, progress: dict, resolved_recipe: dict,
                     compression: dict | None = None) -> Path:
    """Write one complete checkpoint atomically to `directory`, replacing one already there.
    `compression`: the gradient compressor's state, every worker's (compression.PowerSGD.combine)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    temporary = _scratch_name(directory, "partial")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    import torch
    from safetensors.torch import save_file

    try:
        save_file(model_weights(model), str(temporary / WEIGHTS), metadata={"format": "pt"})
        # No RNG state: dropout is seeded per micro-batch from samples_seen and masks are a pure
        # function of (seed, sample, epoch), so nothing random depends on where a process's RNG stood.
        torch.save({"optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "compression": compression}, temporary / TRAINING)
        (temporary / RECIPE).write_text(json.dumps(resolved_recipe, indent=2) + "\n", encoding="utf-8")
        files = {name: file_sha256(temporary / name) for name in (WEIGHTS, TRAINING, RECIPE)}
        state = {"format_version": FORMAT_VERSION, **progress, "files": files}
        (temporary / STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
        for name in (*files, STATE):
            fsync_path(temporary / name)
        fsync_path(temporary)
        replaced = None
        if directory.exists():
            # A directory cannot be renamed over a non-empty one: move the old one aside first, so
            # that at every moment either it or the new one is reachable (under one of two names).
            replaced = _scratch_name(directory, "replaced")
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(directory, replaced)
        os.rename(temporary, directory)
        fsync_path(directory.parent)  # the rename itself survives a crash
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException as error:
        cause = write_failure(error, temporary)  # before the partial files are removed: a full disk
        shutil.rmtree(temporary, ignore_errors=True)
        if cause is not None:
            raise cause from None
        raise
    return directory


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """`step-<N>` directories under RUN_DIR/checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


SCRATCH_DIR = re.compile(r"^\.(?:diagnostic-)?step-\d+\.(?:partial|replaced)-(?:(?P<host>.+)-)?(?P<pid>\d+)$")


def _writer_is_gone(name: str) -> bool:
    """True for a scratch directory whose writer no longer runs: written by this process (a save
    that failed half-way), or on this host by a process that has exited. Another host's scratch
    directories are left alone: from here, nothing tells whether their writer still runs."""
    match = SCRATCH_DIR.match(name)
    if match is None:
        return False
    host, pid = match.group("host"), int(match.group("pid"))
    if host is not None and host != socket.gethostname():
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # it exists, owned by someone else
        return False
    return False


def prune(run_dir: Path, keep: int, sole_writer: bool = False) -> None:
    """Keep the newest `keep` checkpoints, and drop the scratch directories of writers that are gone
    (never those of a writer still at work: another run on this directory must not lose its save).
    sole_writer: the caller holds RUN_DIR/lock, so no other writer is at work on any host and every
    scratch directory (its own failed saves, another host's, an elastic job's previous rank 0's) is
    a leftover."""
    for _, path in step_dirs(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for path in root.iterdir():
            leftover = SCRATCH_DIR.match(path.name) if sole_writer else _writer_is_gone(path.name)
            if path.is_dir() and leftover:
                shutil.rmtree(path, ignore_errors=True)


def discard_later(run_dir: Path, step: int, replaced_by: str = "this resume") -> list[Path]:
    """Remove the checkpoints after `step` when a run goes on from `step` (a resume, an elastic
    rollback to its last commit): they belong to the history that is replaced (or were skipped as
    damaged). A later `--resume auto` must not pick one of them over the new history's own, and a
    redone step must not take one for its own: it has the same step and position (holds_state)."""
    later = [path for n, path in step_dirs(run_dir) if n > step]
    for path in later:
        log.warning("hvdbert: removing %s: it comes after step %d, from the history %s replaces",
                    path, step, replaced_by)
        shutil.rmtree(path)
    return later


# ------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Checkpoint:
    path: Path
    state: dict  # state.json
    recipe: dict  # recipe.json

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def weights(self) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(self.path / WEIGHTS))
        except (SafetensorError, OSError) as error:
            raise CorruptCheckpoint(f"{self.path / WEIGHTS}: not readable safetensors: {error}") from None

    def training(self) -> dict:
        """Optimizer and scaler state. weights_only=True: tensors and plain containers only."""
        import torch

        try:
            return torch.load(self.path / TRAINING, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise CorruptCheckpoint(
                f"{self.path / TRAINING}: refused: not a plain tensor checkpoint ({first_line})"
            ) from None


def open_checkpoint(path: Path, verify: bool = True) -> Checkpoint:
    """Read state.json and recipe.json of a complete checkpoint; check the files' sha256 sums."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"checkpoint {path} does not exist; pass a RUN_DIR/checkpoints/step-<N> "
                         "directory or --resume auto")
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        recipe = json.loads((path / RECIPE).read_text(encoding="utf-8"))
        files = state["files"]
        int(state["step"]), int(state["samples_seen"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpoint(f"{path} is not a complete hvdbert checkpoint ({type(error).__name__}: "
                                f"{error})") from None
    if state.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpoint(f"{path}: checkpoint format {state.get('format_version')}; this hvdbert "
                                f"reads format {FORMAT_VERSION}")
    if verify:
        for name in (WEIGHTS, TRAINING, RECIPE):
            if not (path / name).is_file():
                raise CorruptCheckpoint(f"{path} is not a complete hvdbert checkpoint: {name} is missing")
            if file_sha256(path / name) != files.get(name):
                raise CorruptCheckpoint(f"{path / name} is damaged: its sha256 differs from state.json's")
    return Checkpoint(path, state, recipe)


def newest_checkpoint(run_dir: Path, read: Callable[[Checkpoint], Any] = lambda found: None,
                      attempts: int = 5) -> tuple[Checkpoint, Any] | None:
    """The newest complete checkpoint in RUN_DIR and what `read` takes from it (its weights, say),
    while the run may still be writing. A checkpoint that disappears while it is read was pruned by
    the writer, which saved a newer one first: the newest is looked for again, and the pruned one is
    never called damaged. Damaged ones (still there, unreadable) are skipped with a warning."""
    for _ in range(attempts):
        pruned = False
        for _, path in reversed(step_dirs(run_dir)):
            try:
                found = open_checkpoint(path)
                return found, read(found)
            except UsageError as error:
                if not path.is_dir():
                    pruned = True
                    break
                log.warning("hvdbert: skipping checkpoint %s: %s", path, error)
        if not pruned:
            break
    return None


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest complete checkpoint in RUN_DIR; damaged ones are skipped with a warning."""
    found = newest_checkpoint(run_dir)
    return found[0] if found is not None else None


def holds_state(directory: Path, state) -> bool:
    """True when `directory` is an intact checkpoint of exactly this step and data position; anything
    else found under its name (damaged, or of another history) is to be replaced."""
    if not directory.is_dir():
        return False
    try:
        found = open_checkpoint(directory)
    except UsageError:
        return False
    return (found.step, int(found.state["samples_seen"])) == (state.step, state.samples_seen)


def checkpoint_of_run(run_dir: Path, explicit: Path | None) -> Checkpoint:
    """`explicit` (a checkpoint directory), else the newest intact checkpoint of `run_dir`; refuses
    (UsageError) a run directory that is missing or holds none."""
    return checkpoint_and_weights(run_dir, explicit, read_weights=False)[0]


def checkpoint_and_weights(run_dir: Path, explicit: Path | None,
                           read_weights: bool = True) -> tuple[Checkpoint, dict[str, torch.Tensor] | None]:
    """checkpoint_of_run's checkpoint and its weights, read together: of a run still being written,
    the newest checkpoint that stays until its weights are in memory (newest_checkpoint)."""
    def read(found: Checkpoint):
        return found.weights() if read_weights else None

    if explicit:
        found = open_checkpoint(explicit)
        return found, read(found)
    if not run_dir.is_dir():
        raise UsageError(f"--run {run_dir} does not exist; pass a directory hvdbert.pretrain wrote")
    chosen = newest_checkpoint(run_dir, read)
    if chosen is None:
        damaged = len(step_dirs(run_dir))
        why = (f"its {damaged} checkpoint(s) are all damaged (see the warnings above)" if damaged
               else "it holds no checkpoint under checkpoints/step-<N>")
        raise UsageError(f"--run {run_dir}: no checkpoint to use: {why}")
    return chosen


# ------------------------------------------------------------------------------------------------
# Checks and loading


def check_compatible(checkpoint: Checkpoint, model_fields: dict, tokenizer_sha256: str,
                     allow_longer_positions: bool = False) -> None:
    """Refuse a checkpoint of another model family, shape or vocabulary (one line, naming the
    differences). With allow_longer_positions (a later phase's checkpoint.init_from), the family's
    phase fields may differ: longer context and, for ModernBERT, its RoPE thetas."""
    saved, model_fields = families.same_model(checkpoint.recipe.get("model", {}), model_fields)
    phase_fields = families.family_of(model_fields).phase_fields if allow_longer_positions else ()
    keys = sorted(set(saved) | set(model_fields))
    differ = [k for k in keys if saved.get(k) != model_fields.get(k) and k not in phase_fields]
    if differ:
        listed = ", ".join(f"model.{k} = {saved.get(k)!r} there, {model_fields.get(k)!r} here" for k in differ)
        raise UsageError(f"checkpoint {checkpoint.path} is of a different model: {listed}; "
                         "use the recipe it was trained with")
    if allow_longer_positions:
        default = families.config_fields(families.family_of(model_fields))["max_position_embeddings"]
        old = saved.get("max_position_embeddings", default)
        new = model_fields.get("max_position_embeddings", default)
        if new < old:
            raise UsageError(f"checkpoint.init_from {checkpoint.path} has {old} position embeddings but "
                             f"model.max_position_embeddings = {new}; it can only grow")
    saved_tokenizer = checkpoint.state.get("tokenizer_sha256")
    if saved_tokenizer and saved_tokenizer != tokenizer_sha256:
        raise UsageError(f"checkpoint {checkpoint.path} was trained with another tokenizer (vocabulary "
                         f"sha256 {saved_tokenizer[:12]}, the data has {tokenizer_sha256[:12]}); "
                         "pass the --data it was trained on")


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Path,
                 extend_positions: bool = False) -> None:
    """Copy checkpoint weights into `model`. With extend_positions, a checkpoint with fewer position
    embeddings fills the first rows and the new rows keep their fresh initialisation (phase 2 at
    512 tokens from a phase 1 trained at 128)."""
    import torch

    own = model.state_dict()
    for name, tensor in weights.items():
        if name not in own:
            raise CorruptCheckpoint(f"{source}: unexpected tensor {name}: not a {type(model).__name__} of this shape")
        target = own[name]
        if name == POSITION_EMBEDDINGS and extend_positions and tensor.shape[0] < target.shape[0]:
            with torch.no_grad():
                target[: tensor.shape[0]].copy_(tensor)
            continue
        if tensor.shape != target.shape:
            raise UsageError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model "
                             f"{tuple(target.shape)}: use the recipe it was trained with")
        with torch.no_grad():
            target.copy_(tensor)
    loaded = {t.data_ptr() for n, t in own.items() if n in weights}
    missing = [n for n, t in own.items() if n not in weights and t.data_ptr() not in loaded]
    if missing:
        raise CorruptCheckpoint(f"{source}: missing tensors {', '.join(missing[:3])}")


def restore_training(checkpoint: Checkpoint, model, optimizer, scaler, compressor=None) -> None:
    """Model, optimizer and GradScaler state from `checkpoint` (rank 0; broadcast afterwards). A
    stateful gradient compressor gets the checkpoint's compression state (None if it held none) to
    hand out in Run.broadcast_from_rank0, where each worker takes its part."""
    load_weights(model, checkpoint.weights(), checkpoint.path / WEIGHTS)
    training = checkpoint.training()
    try:
        optimizer.load_state_dict(training["optimizer"])
    except (ValueError, KeyError) as error:
        raise UsageError(f"{checkpoint.path / TRAINING}: optimizer state does not fit this optimizer "
                         f"({error}); resume with the optim.name it was trained with") from None
    if scaler is not None and training.get("scaler"):
        scaler.load_state_dict(training["scaler"])
    if compressor is not None and compressor.stateful:
        compressor.restored = (True, training.get("compression"))


# ------------------------------------------------------------------------------------------------
# Stop requests (preemption)


class StopRequest:
    """Set by SIGTERM (SLURM preemption, `scancel`, Kubernetes) or SIGINT; the training loop finishes
    its step, agrees with the other ranks to stop, saves a checkpoint and exits 0."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        log.warning("hvdbert: %s received: finishing this step, then saving a checkpoint", self.signal_name)


# ------------------------------------------------------------------------------------------------
# The training loop's view


class Checkpointer(StepHook):
    """Saves the whole training state every `every_steps` steps and at the end of the loop (its last
    step, or a stop request), and a diagnostic one when training diverges; rank 0 writes, every rank
    waits for it (so no rank exits, or is preempted, before the checkpoint is complete)."""

    def __init__(self, run, run_dir: Path, resolved_recipe: dict, lock=None):
        self.run = run  # hvdbert.run.Run: model, optimizer, precision, plan, the distributed layer
        self.run_dir = Path(run_dir)
        self.lock = lock  # runlock.RankZeroLock: while it is exclusive, no one else writes checkpoints here
        self.every_steps = run.recipe.checkpoint.every_steps
        self.keep = run.recipe.checkpoint.keep
        # rundir.resolved_recipe(run); its plan is replaced by the run's current one at each save
        self.resolved_recipe = resolved_recipe

    def _progress(self, state, kind: str) -> dict:
        plan = self.run.plan
        # samples_seen is in global sample units: a run on any worker count resumes there.
        return {**state.state_dict(), "kind": kind,
                "world_size": self.run.dist.size, "global_batch_size": plan.global_batch_size,
                "accumulation_steps": plan.accumulation_steps,
                "lr_schedule": {"note": "lr is a function of step (optim.lr_at)", **{
                    k: getattr(plan, k) for k in ("lr", "warmup_steps", "max_steps", "decay_power", "end_lr", "schedule",
                                                "decay_steps", "decay_shape")}},
                "scaler_skipped_steps": self.run.precision.skipped_steps,
                "tokenizer_sha256": self.resolved_recipe["tokenizer_sha256"]}

    def _compression_state(self) -> dict | None:
        """Every worker's compressor state, on rank 0 (a collective: every rank calls it)."""
        compressor = self.run.compressor
        if compressor is None or not compressor.stateful:
            return None
        parts = self.run.dist.allgather_object(compressor.state_dict(), name="compression_checkpoint")
        return compressor.combine(parts) if self.run.dist.rank == 0 else None

    def _write(self, directory: Path, state, kind: str) -> Path:
        run = self.run
        compression = self._compression_state()
        if run.dist.rank == 0:
            write_checkpoint(directory, run.model, run.optimizer, run.precision.scaler, self._progress(state, kind),
                             {**self.resolved_recipe, "plan": run.plan.to_dict()}, compression)
        run.dist.barrier()
        return directory

    def save(self, state) -> Path:
        directory = self.run_dir / CHECKPOINTS / f"step-{state.step}"
        run = self.run
        compression = self._compression_state()
        if run.dist.rank == 0:
            if holds_state(directory, state):  # a resumed run that had nothing left to do
                log.info("hvdbert: checkpoint %s is up to date", directory)
            else:
                write_checkpoint(directory, run.model, run.optimizer, run.precision.scaler,
                                 self._progress(state, "regular"),
                                 {**self.resolved_recipe, "plan": run.plan.to_dict()}, compression)
                prune(self.run_dir, self.keep, sole_writer=self.lock is not None and self.lock.exclusive)
                log.info("hvdbert: checkpoint %s (%d samples seen)", directory, state.samples_seen)
        run.dist.barrier()  # every rank waits: none exits (or is preempted) before the save is complete
        return directory

    def save_diagnostic(self, state) -> Path:
        """The state when training diverged, under a name `--resume auto` never picks."""
        return self._write(self.run_dir / CHECKPOINTS / f"diagnostic-step-{state.step}", state, "diagnostic")

    # The loop's points (hooks.StepHook)
    def step_end(self, run) -> None:
        if run.state.step % self.every_steps == 0:
            self.save(run.state)

    def run_end(self, run, stopped: bool) -> None:
        if stopped or run.state.step % self.every_steps:
            self.save(run.state)

    def diverged(self, run) -> str | None:
        return str(self.save_diagnostic(run.state))
