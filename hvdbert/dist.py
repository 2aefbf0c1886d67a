"""The distributed layer: the only module that imports horovod.torch.

Everything else asks a `Distributed` object for rank, size and collectives. `init_distributed()`
returns `HorovodDistributed` when Horovod is installed (under horovodrun, mpirun, or as one plain
process, which Horovod runs as size 1) and `SingleProcess` when it is not, so a machine without
Horovod (a GPU box for a quick benchmark, say) still trains on one process.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import signal
import socket
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterator, Protocol

import torch

from hvdbert.compression import SINGLE_PROCESS, Collectives, copy_flat_into, grads_or_zeros
from hvdbert.config import DistConfig
from hvdbert.errors import UsageError
from hvdbert.launcher import elastic_launch, launcher_marker

# Failure bounds (set only where the environment does not already): a rank that DIES is noticed at
# once by horovodrun or mpirun, which stop the job with a non-zero status; a rank that HANGS (a stuck
# filesystem, a deadlocked data thread) leaves the others waiting in a collective. Horovod warns after
# HOROVOD_STALL_CHECK_TIME_SECONDS and, with HOROVOD_STALL_SHUTDOWN_TIME_SECONDS > 0 (Horovod's default
# is 0: wait forever), shuts the job down. 600 s is far above the longest legitimate wait (rank 0
# writing a BERT-large checkpoint while the others stand at a barrier). That covers a rank that still
# negotiates but never submits a tensor; a rank that is frozen or cut off as a whole is caught by
# CollectiveWatchdog (dist.stall_timeout_seconds) instead.
FAILURE_TIMEOUTS = {
    "HOROVOD_STALL_CHECK_TIME_SECONDS": "60",
    "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "600",
}

# `kill -USR2 PID` makes a Horovod worker print every thread's Python stack to stderr and go on:
# where a worker that seems stuck is waiting (the stall watchdog prints the same before it ends one).
# Not SIGUSR1: SLURM's --signal and some schedulers send that one to ask for a checkpoint.
STACKS_SIGNAL = signal.SIGUSR2


STALL_EXIT_STATUS = 4  # a worker that ended itself because a collective stalled (docs/clusters.md)


def thread_stacks() -> str:
    """Every thread's Python stack, most recent call first (the layout of faulthandler's, which
    STACKS_SIGNAL prints from C, whatever the main thread is doing), with each thread's name, as one
    string: one write keeps a launcher's per-line prefixes whole."""
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    blocks = []
    for ident, frame in sys._current_frames().items():
        calls = [f'  File "{f.filename}", line {f.lineno} in {f.name}'
                 for f in reversed(traceback.extract_stack(frame))]
        blocks.append("\n".join([f"Thread {ident:#x} [{names.get(ident, '?')}] (most recent call first):", *calls]))
    return "\n\n".join(blocks)


class CollectiveWatchdog:
    """Ends this worker when one collective has waited longer than `seconds`.

    Why Horovod's own stall shutdown is not enough: its stall inspector runs on the coordinator once
    per negotiation cycle, and it can only name tensors that some ranks submitted and others did not.
    A frozen (SIGSTOPped) or cut-off rank takes no part in the cycle at all, so the coordinator
    blocks inside the cycle's own collective (MPI_Allreduce/MPI_Gather of the request lists) and
    the inspector never runs again. Over Gloo that collective times out (HOROVOD_GLOO_TIMEOUT_SECONDS,
    30 s) and the job ends; over MPI it waits forever, since MPI has no timeout. So each worker
    watches itself: the calls below mark when they start waiting, a thread checks every few
    seconds, and past the bound it prints one line and exits with STALL_EXIT_STATUS. The launcher
    (horovodrun, mpirun, srun) then stops the other workers, the frozen one included.
    Exiting at once (os._exit) is safe for the run directory: checkpoints are renamed into place
    whole, and metrics.jsonl is flushed line by line."""

    def __init__(self, seconds: float, describe: Callable[[], str]):
        self.seconds = seconds
        self.describe = describe  # "rank R (host H)", for the message (the rank changes under elastic)
        self._waiting: tuple[float, str] | None = None
        self._thread = threading.Thread(target=self._watch, name="hvdbert-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        self._waiting = (time.monotonic(), what)
        try:
            yield
        finally:
            self._waiting = None

    def _watch(self) -> None:
        period = min(5.0, max(self.seconds / 10, 0.5))
        last = time.monotonic()
        while True:
            time.sleep(period)
            now = time.monotonic()
            # A sleep that overran by far means this process itself did not run (SIGSTOP, a paused
            # VM): then the long wait is its own, not another worker's.
            stopped, last = now - last - period, now
            waiting = self._waiting
            if waiting is None:
                continue
            waited = now - waiting[0]
            if waited > self.seconds:
                cause = (f"this worker itself did not run for {stopped:.0f} s of it (stopped, or its host paused)"
                         if stopped > self.seconds / 2 else "another worker is frozen or cut off")
                print(f"hvdbert: error: {self.describe()} waited {waited:.0f} s in {waiting[1]}, longer than "
                      f"dist.stall_timeout_seconds = {self.seconds:g}: {cause}; "
                      f"ending this worker so that the launcher stops the job (continue with --resume auto); "
                      f"where its threads were:\n{thread_stacks()}", file=sys.stderr, flush=True)
                os._exit(STALL_EXIT_STATUS)


class Distributed(Protocol):
    """What the rest of hvdbert asks of the distributed layer: who am I, and the collectives.

    Implemented by `SingleProcess` (no Horovod), `HorovodDistributed`, and the benchmark's PyTorch DDP
    peer. Collectives are called by every rank in the same order; `name` identifies them to Horovod."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    backend: str
    # Horovod elastic: workers may join a running job. A joining worker meets the others only inside
    # the elastic loop (at the state's sync), so nothing before it may be a collective.
    elastic: bool

    def wrap_forward(self, forward: torch.nn.Module) -> torch.nn.Module: ...
    # compressor: compression.Bf16Wire or PowerSGD, which then reduces the gradients in synchronize();
    # bucket_mb: dist.bucket_mb (Horovod: GradientBuckets when > 0)
    def wrap_optimizer(self, optimizer, model, accumulation_steps: int, fp16_allreduce: bool,
                       compressor=None, bucket_mb: float = 0.0): ...
    def broadcast_model_and_optimizer(self, model: torch.nn.Module, optimizer) -> None: ...
    def broadcast_object(self, obj: Any, name: str) -> Any: ...
    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor: ...
    def allreduce_sum_async(self, tensor: torch.Tensor, name: str) -> Any: ...
    def wait(self, handle: Any) -> torch.Tensor: ...
    def allgather_object(self, obj: Any, name: str) -> list: ...
    def barrier(self, bounded: bool = True) -> None: ...
    def synchronize(self, optimizer) -> None: ...
    def skip_synchronize(self, optimizer) -> contextlib.AbstractContextManager: ...
    def set_accumulation_steps(self, optimizer, accumulation_steps: int) -> None: ...
    def elastic_run(self, fn, state_objects: dict, on_reset, before_sync=None): ...
    def shutdown(self) -> None: ...


class SingleProcess:
    """One process, no Horovod: collectives are identities."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    backend = "none"
    elastic = False

    def wrap_forward(self, forward: torch.nn.Module) -> torch.nn.Module:
        return forward  # Horovod reduces through the optimizer's hooks, not the forward

    compressor = None  # set by wrap_optimizer: hvdbert's own compression (hvdbert/compression.py)

    def wrap_optimizer(self, optimizer, model, accumulation_steps: int, fp16_allreduce: bool,
                       compressor=None, bucket_mb: float = 0.0):
        # A compressor runs on one process too (its collectives are identities): the run then follows
        # the recursion N workers' average follows (compression.PowerSGD).
        self.compressor = compressor
        return optimizer

    def broadcast_model_and_optimizer(self, model: torch.nn.Module, optimizer) -> None:
        pass

    def broadcast_object(self, obj: Any, name: str) -> Any:
        return obj

    def allgather_object(self, obj: Any, name: str) -> list:
        return [obj]

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor

    def allreduce_sum_async(self, tensor: torch.Tensor, name: str) -> Any:
        return tensor

    def wait(self, handle: Any) -> torch.Tensor:
        return handle

    def barrier(self, bounded: bool = True) -> None:
        pass

    def synchronize(self, optimizer) -> None:
        if self.compressor is not None:
            self.compressor.reduce(SINGLE_PROCESS)

    @contextlib.contextmanager
    def skip_synchronize(self, optimizer) -> Iterator[None]:
        yield

    def shutdown(self) -> None:
        pass

    def set_accumulation_steps(self, optimizer, accumulation_steps: int) -> None:
        pass

    def elastic_run(self, fn, state_objects: dict, on_reset, before_sync=None):
        raise UsageError("--elastic needs Horovod elastic: run under horovodrun with --min-np/--max-np "
                         "and --host-discovery-script (see docs/resume.md)")


def cycle_time_ms(cfg: DistConfig) -> float:
    """dist.cycle_time_ms, or by device when 0: on CPU Horovod's background thread shares the cores
    that compute, and a 10 ms cycle beat its 1 ms default over Gloo (docs/performance.md); with
    CUDA and NCCL, Horovod's 1 ms default."""
    if cfg.cycle_time_ms > 0:
        return cfg.cycle_time_ms
    return 1.0 if torch.cuda.is_available() else 10.0


def horovod_knobs(cfg: DistConfig, elastic: bool) -> dict[str, str]:
    """The environment Horovod reads its tuning knobs from when hvd.init starts its background thread
    (set where the environment does not already). Under dist.autotune, Horovod searches the fusion
    threshold and cycle time itself: a value set here would fix it and take it out of the search."""
    knobs: dict[str, str] = {}
    if cfg.autotune:
        knobs["HOROVOD_AUTOTUNE"] = "1"
        if cfg.autotune_log:
            knobs["HOROVOD_AUTOTUNE_LOG"] = cfg.autotune_log
    else:
        knobs["HOROVOD_FUSION_THRESHOLD"] = str(cfg.fusion_threshold_mb * 1024 * 1024)
        if not elastic:
            # Not under elastic: with both the cycle time and the fusion threshold fixed, Horovod
            # 0.28.1 crashed (SIGSEGV in hvd.init) re-initialising after a lost worker, on every try here.
            knobs["HOROVOD_CYCLE_TIME"] = str(cycle_time_ms(cfg))
    if cfg.cache_capacity != DistConfig.cache_capacity:  # the default is Horovod's own: left to Horovod
        knobs["HOROVOD_CACHE_CAPACITY"] = str(cfg.cache_capacity)
    return knobs


class GradientBuckets:
    """The gradients averaged in buckets as backward fills them (dist.bucket_mb): DDP's scheme, over
    Horovod. Parameters go into buckets of about `bucket_bytes` in the reverse of their order (the
    order backward reaches them); when every gradient of a bucket is final (the step's last local
    pass), it is copied into the bucket's flat buffer (cast to fp16 with fp16 compression) and one
    allreduce of the buffer starts, while backward goes on. synchronize() waits for them and copies
    the averages back into the gradients. Against Horovod's hooks: a few allreduces per step instead
    of one per tensor to negotiate, one cast per bucket, and no fusion-buffer copies for a bucket
    that is alone in its cycle (Horovod still fuses those that meet in one)."""

    def __init__(self, hvd, named_parameters, bucket_bytes: float, accumulation_steps: int, fp16: bool,
                 settle: Callable[[list], None]):
        self.hvd = hvd
        self.settle = settle
        self.accumulation_steps = accumulation_steps
        params = [p for _, p in reversed(list(named_parameters)) if p.requires_grad]
        self.buckets: list[list[torch.nn.Parameter]] = [[]]
        size = 0
        for p in params:
            if self.buckets[-1] and size + 4 * p.numel() > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += 4 * p.numel()
        dtype = torch.float16 if fp16 else torch.float32
        self.buffers = [torch.zeros(sum(p.numel() for p in bucket), dtype=dtype, device=bucket[0].device)
                        for bucket in self.buckets]
        self.where = {}
        for index, bucket in enumerate(self.buckets):
            for p in bucket:
                self.where[p] = index
                p.register_post_accumulate_grad_hook(self._accumulated)
        self.clear()

    def clear(self) -> None:
        """Forget the step in progress (after synchronize, or an elastic reset)."""
        self.passes = dict.fromkeys(self.where, 0)
        self.missing = [len(bucket) for bucket in self.buckets]
        self.handles: list[Any] = [None] * len(self.buckets)

    def _accumulated(self, p: torch.nn.Parameter) -> None:
        self.passes[p] += 1
        if self.passes[p] == self.accumulation_steps:
            index = self.where[p]
            self.missing[index] -= 1
            if self.missing[index] == 0:
                self._start(index)

    def _start(self, index: int) -> None:
        buffer, offset = self.buffers[index], 0
        for g in grads_or_zeros(self.buckets[index]):  # one not produced this step: zeros, as in Horovod
            buffer[offset:offset + g.numel()].copy_(g.reshape(-1))
            offset += g.numel()
        self.handles[index] = self.hvd.allreduce_async_(buffer, op=self.hvd.Average, name=f"gradient_bucket.{index}")

    def synchronize(self) -> None:
        for index, handle in enumerate(self.handles):
            if handle is None:  # some gradient of it was not produced this step
                self._start(index)
        self.settle(self.handles)
        for index, handle in enumerate(self.handles):  # every gradient exists now (_start made the missing ones)
            copy_flat_into(self.hvd.synchronize(handle), [p.grad for p in self.buckets[index]])
        self.clear()


class HorovodDistributed(SingleProcess):
    """Horovod over Gloo or MPI (NCCL for GPU tensors when Horovod was built with it)."""

    def __init__(self, cfg: DistConfig):
        import horovod.torch as hvd

        for name, value in horovod_knobs(cfg, elastic_launch()).items():
            os.environ.setdefault(name, value)
        for name, value in FAILURE_TIMEOUTS.items():
            os.environ.setdefault(name, value)
        hvd.init()
        self.hvd = hvd
        faulthandler.register(STACKS_SIGNAL, file=sys.stderr, all_threads=True)
        self.poll_seconds = cfg.poll_interval_ms / 1000
        self.buckets: GradientBuckets | None = None
        self.elastic = elastic_launch()
        self.refresh()
        host = socket.gethostname()
        self.watchdog = (CollectiveWatchdog(cfg.stall_timeout_seconds, lambda: f"rank {self.rank} (host {host})")
                         if cfg.stall_timeout_seconds > 0 else None)

    def _waiting(self, what: str):
        return self.watchdog.waiting(what) if self.watchdog is not None else contextlib.nullcontext()

    def refresh(self) -> None:
        """Read rank and size from Horovod (again after an elastic reset)."""
        hvd = self.hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.local_rank = hvd.local_rank()
        self.local_size = hvd.local_size()
        self.backend = "gloo" if hvd.gloo_enabled() and hvd.gloo_built() else "mpi"

    def wrap_optimizer(self, optimizer, model, accumulation_steps: int, fp16_allreduce: bool,
                       compressor=None, bucket_mb: float = 0.0):
        hvd = self.hvd
        # what reduces this optimizer's gradients (a second call, for another model, replaces both)
        self.compressor, self.buckets = compressor, None
        if compressor is not None:
            # hvdbert's own compression: the plain optimizer, and every gradient reduced at once in
            # synchronize() (the local passes of an accumulated step sum into .grad meanwhile).
            return optimizer
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if bucket_mb > 0:
            self.buckets = GradientBuckets(hvd, named, bucket_mb * 1024 * 1024, accumulation_steps, fp16_allreduce,
                                           self._settle)
            return optimizer
        # Horovod: allreduce averages gradients across workers; backward_passes_per_step makes it sum
        # the local micro-batches first and reduce once per optimizer step (so the loss is divided by
        # accumulation_steps by the caller). fp16 compression halves the bytes on the wire.
        return hvd.DistributedOptimizer(
            optimizer,
            named_parameters=named,
            backward_passes_per_step=accumulation_steps,
            compression=hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none,
            op=hvd.Average,
        )

    def broadcast_model_and_optimizer(self, model: torch.nn.Module, optimizer) -> None:
        # Horovod: every rank starts from rank 0's weights and optimizer state (random init or a
        # checkpoint that only rank 0 read). The caller creates the optimizer state first
        # (optim.init_state), so Horovod does not run its state-creating zero-gradient step.
        with self._waiting("the broadcast of the model"):
            self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
            self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def broadcast_object(self, obj: Any, name: str) -> Any:
        with self._waiting(f"broadcast {name}"):
            return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def allgather_object(self, obj: Any, name: str) -> list:
        # Horovod: every rank gets every rank's object, in rank order (a pickled, small object).
        with self._waiting(f"allgather {name}"):
            return self.hvd.allgather_object(obj, name=name)

    def _settle(self, handles) -> None:
        """Return when every one of `handles` is done, polling with sleeps that double from 0.05 ms
        to dist.poll_interval_ms. Horovod's synchronize() spins (sched_yield in a loop) until its
        handle is done, so a worker waiting on a slow link holds a core at 100%: on hosts that
        share cores, 1.6x the CPU time per step at 100 Mbit/s and 2.8x the step time at 4 hosts and
        200 Mbit/s (docs/performance.md).
        After this, synchronize() returns at once. dist.poll_interval_ms = 0 leaves the wait to
        Horovod."""
        if self.poll_seconds <= 0:
            return
        for handle in handles:
            pause = min(5e-5, self.poll_seconds)
            while not self.hvd.poll(handle):
                time.sleep(pause)
                pause = min(2 * pause, self.poll_seconds)

    def _finish(self, handle: Any) -> Any:
        """The result of one Horovod operation, waited for by `_settle`."""
        self._settle([handle])
        return self.hvd.synchronize(handle)

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        with self._waiting(f"allreduce {name}"):
            return self._finish(self.hvd.allreduce_async(tensor, op=self.hvd.Sum, name=name))

    def allreduce_sum_async(self, tensor: torch.Tensor, name: str) -> Any:
        # Horovod: submitted next to the gradient allreduces, it is fused with them (no extra round trip).
        return self.hvd.allreduce_async(tensor, op=self.hvd.Sum, name=name)

    def wait(self, handle: Any) -> torch.Tensor:
        with self._waiting("an allreduce"):
            return self._finish(handle)

    def barrier(self, bounded: bool = True) -> None:
        """bounded=False: a wait that may legitimately last long (another rank preparing data)."""
        if not bounded:
            self.hvd.barrier()
            return
        with self._waiting("a barrier"):
            self.hvd.barrier()

    def synchronize(self, optimizer) -> None:
        # Horovod: wait for the gradient allreduces so they can be unscaled and clipped before step().
        with self._waiting("the gradient allreduce"):
            if self.compressor is not None:
                self.compressor.reduce(self._collectives())
            elif self.buckets is not None:
                self.buckets.synchronize()
            else:
                # the allreduces backward started (DistributedOptimizer's handles by parameter; None
                # for a parameter whose gradient was not produced, which synchronize() submits itself)
                self._settle([handle for handle, _ in optimizer._handles.values() if isinstance(handle, int)])
                optimizer.synchronize()

    def _collectives(self) -> Collectives:
        hvd = self.hvd
        # Horovod: the compressor's tensors (one of each kind per step) are averaged or gathered
        # whole; each call returns when its collective is done.
        return Collectives(
            allreduce_mean=lambda tensor, name: self._finish(hvd.allreduce_async(tensor, op=hvd.Average, name=name)),
            allgather=lambda tensor, name: self._finish(hvd.allgather_async(tensor, name=name)))

    @contextlib.contextmanager
    def skip_synchronize(self, optimizer) -> Iterator[None]:
        if self.compressor is not None or self.buckets is not None:  # a plain optimizer: its step() reduces nothing
            yield
            return
        with optimizer.skip_synchronize():
            yield

    def shutdown(self) -> None:
        self.hvd.shutdown()

    def elastic_run(self, fn, state_objects: dict, on_reset, before_sync=None):
        """Run fn(state) under Horovod elastic (Gloo only). `state_objects` (model, optimizer and plain
        counters) are committed by `state.commit()` and restored to the last commit when a worker is
        lost; then Horovod re-forms the ring, calls `on_reset` (after refreshing rank and size here),
        syncs the state from the new rank 0 and runs fn again. `before_sync()`, when given, runs on
        every worker right before each sync: the first collective a joining worker takes part in."""
        hvd = self.hvd
        if not hvd.gloo_enabled():
            raise UsageError("--elastic needs Horovod over Gloo: launch with horovodrun --min-np/--max-np "
                             "--host-discovery-script (not mpirun)")

        class State(hvd.elastic.TorchState):
            def sync(self) -> None:
                # Horovod: every worker syncs here after a reset (a new one before its first step), so
                # checks that every worker must pass go first, before rank 0's state overwrites theirs.
                if before_sync is not None:
                    before_sync()
                super().sync()

        state = State(**state_objects)

        def reset() -> None:
            self.refresh()
            on_reset()

        state.register_reset_callbacks([reset])
        return hvd.elastic.run(fn)(state)

    def set_accumulation_steps(self, optimizer, accumulation_steps: int) -> None:
        # Horovod: after an elastic resize the same global batch needs another number of local passes.
        if self.buckets is not None:
            self.buckets.accumulation_steps = accumulation_steps
            self.buckets.clear()
        elif self.compressor is None:  # a compressor reduces once per step, whatever the passes
            optimizer.set_backward_passes_per_step(accumulation_steps)


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


def init_distributed(cfg: DistConfig) -> Distributed:
    """Horovod for the workers a launcher started; one plain process has no one to talk to, so it runs
    without Horovod, whether or not Horovod is installed: no MPI singleton start-up (which some
    clusters' MPI refuses outside mpirun/srun), and a caller may run commands' main() again in the
    same process (Horovod cannot start again once shut down)."""
    marker = launcher_marker()
    if marker is None:
        return SingleProcess()
    if not horovod_available():
        raise UsageError(
            f"started by a multi-process launcher ({marker} is set) but Horovod is not "
            "installed; run `make setup` or launch one plain process"
        )
    return HorovodDistributed(cfg)
