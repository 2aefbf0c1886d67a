"""The distributed layer: the only module that imports horovod.torch.

Everything else asks a `Distributed` object for rank, size and collectives. `init_distributed()`
returns `HorovodDistributed` when Horovod is installed (under horovodrun, mpirun, or as one plain
process, which Horovod runs as size 1) and `SingleProcess` when it is not, so a machine without
Horovod (a GPU box for a quick benchmark, say) still trains on one process.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

from hvdbert.config import DistConfig
from hvdbert.errors import UsageError

_LAUNCHER_VARIABLES = ("HOROVOD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class SingleProcess:
    """One process, no Horovod: collectives are identities."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    backend = "none"

    def wrap_optimizer(self, optimizer, model, accumulation_steps: int, fp16_allreduce: bool):
        return optimizer

    def broadcast_model_and_optimizer(self, model: torch.nn.Module, optimizer) -> None:
        pass

    def broadcast_object(self, obj: Any, name: str) -> Any:
        return obj

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def synchronize(self, optimizer) -> None:
        pass

    @contextlib.contextmanager
    def skip_synchronize(self, optimizer) -> Iterator[None]:
        yield

    def shutdown(self) -> None:
        pass


class HorovodDistributed(SingleProcess):
    """Horovod over Gloo or MPI (NCCL for GPU tensors when Horovod was built with it)."""

    def __init__(self, cfg: DistConfig):
        import horovod.torch as hvd

        # Horovod reads its tuning knobs from the environment when it starts its background thread.
        os.environ.setdefault("HOROVOD_FUSION_THRESHOLD", str(cfg.fusion_threshold_mb * 1024 * 1024))
        os.environ.setdefault("HOROVOD_CYCLE_TIME", str(cfg.cycle_time_ms))
        hvd.init()
        self.hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()
        self.local_rank = hvd.local_rank()
        self.local_size = hvd.local_size()
        self.backend = "gloo" if hvd.gloo_enabled() and hvd.gloo_built() else "mpi"

    def wrap_optimizer(self, optimizer, model, accumulation_steps: int, fp16_allreduce: bool):
        hvd = self.hvd
        # Horovod: allreduce averages gradients across workers; backward_passes_per_step makes it sum
        # the local micro-batches first and reduce once per optimizer step (so the loss is divided by
        # accumulation_steps by the caller). fp16 compression halves the bytes on the wire.
        return hvd.DistributedOptimizer(
            optimizer,
            named_parameters=[(n, p) for n, p in model.named_parameters() if p.requires_grad],
            backward_passes_per_step=accumulation_steps,
            compression=hvd.Compression.fp16 if fp16_allreduce else hvd.Compression.none,
            op=hvd.Average,
        )

    def broadcast_model_and_optimizer(self, model: torch.nn.Module, optimizer) -> None:
        # Horovod: every rank starts from rank 0's weights and optimizer state (random init or a
        # checkpoint that only rank 0 read). The caller creates the optimizer state first
        # (optim.init_state), so Horovod does not run its state-creating zero-gradient step.
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def broadcast_object(self, obj: Any, name: str) -> Any:
        return self.hvd.broadcast_object(obj, root_rank=0, name=name)

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return self.hvd.allreduce(tensor, op=self.hvd.Sum, name=name)

    def barrier(self) -> None:
        self.hvd.barrier()

    def synchronize(self, optimizer) -> None:
        # Horovod: wait for the gradient allreduces so they can be unscaled and clipped before step().
        optimizer.synchronize()

    @contextlib.contextmanager
    def skip_synchronize(self, optimizer) -> Iterator[None]:
        with optimizer.skip_synchronize():
            yield

    def shutdown(self) -> None:
        self.hvd.shutdown()


def init_distributed(cfg: DistConfig) -> SingleProcess:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        launched = [v for v in _LAUNCHER_VARIABLES if v in os.environ]
        if launched:
            raise UsageError(
                f"started by a multi-process launcher ({launched[0]} is set) but Horovod is not "
                "installed; run `make setup` or launch one plain process"
            ) from None
        return SingleProcess()
    return HorovodDistributed(cfg)
