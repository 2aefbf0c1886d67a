"""Peer: PyTorch DistributedDataParallel over Gloo, running hvdbert's own model, data and step.

    python -m torch.distributed.run --standalone --nproc-per-node N -m hvdbert.bench.peers.ddp_model \
        --recipe RECIPE.toml --data DATA_DIR --steps S --warmup-steps W --worker RESULT.json [--set ...]

Everything but the communication layer is hvdbert's: the `Run` that pretrain builds (model with its
gather-first MLM head, optimizer, BatchStream), the measured loop and `train.run_step`. Only the
distributed layer differs: `TorchDDP` implements hvdbert's `Distributed` protocol with
torch.distributed, and gradients are averaged by DDP's bucketed allreduce, which overlaps backward
(Horovod overlaps through its optimizer's gradient hooks). So the ratio of this peer to hvdbert at the
same worker count is Horovod against DDP on the same work.

Compression: dist.fp16_allreduce (or dist.compression = fp16) registers DDP's fp16_compress_hook,
bf16 its bf16_compress_hook (NCCL only: on Gloo refused in one line), and powersgd its PowerSGD hook (torch.distributed.algorithms.ddp_comm_hooks.
powerSGD_hook) at hvdbert's dist.powersgd_rank, with error feedback and warm start, compressing every
matrix a rank-r pair shrinks (min_compression_rate 1, as hvdbert.compression.low_rank), from
max(2, dist.powersgd_start_step) (DDP's hook needs two plain iterations first; it counts DDP's
allreduces, one per backward). Unlike hvdbert's, DDP's hooks keep the overlap with backward.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist

from hvdbert.errors import UsageError, cli_entry


class TorchDDP:
    """hvdbert's distributed layer over torch.distributed (Gloo on CPU, NCCL with CUDA), with DDP."""

    def __init__(self) -> None:
        torch_dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.rank = torch_dist.get_rank()
        self.size = torch_dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        self.backend = f"torch-ddp-{torch_dist.get_backend()}"
        self.elastic = False  # a fixed set of workers: start-up may use collectives
        self.fp16_allreduce = False
        self.compressor = None  # hvdbert's compressor, read for its kind and PowerSGD's settings

    def wrap_forward(self, forward: torch.nn.Module) -> torch.nn.Module:
        # DDP: broadcasts rank 0's weights now, then averages gradients during every backward through
        # this module (each micro-batch's; with loss / accumulation_steps the sum is the average).
        device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        wrapped = torch.nn.parallel.DistributedDataParallel(forward, device_ids=device_ids)
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        if self.fp16_allreduce:  # DDP's counterpart of hvd.Compression.fp16: buckets sent as fp16
            wrapped.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif getattr(self.compressor, "name", None) == "bf16":
            wrapped.register_comm_hook(None, default_hooks.bf16_compress_hook)
        elif getattr(self.compressor, "name", None) == "powersgd":
            state = powerSGD_hook.PowerSGDState(
                process_group=None, matrix_approximation_rank=self.compressor.rank,
                start_powerSGD_iter=max(2, self.compressor.start_step), min_compression_rate=1,
                use_error_feedback=True, warm_start=True, random_seed=self.compressor.seed)
            wrapped.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return wrapped

    def wrap_optimizer(self, optimizer, model, accumulation_steps: int, fp16_allreduce: bool,
                       compressor=None, bucket_mb: float = 0.0):
        # run.build_run wraps the optimizer before the forward: wrap_forward registers the hook. hvdbert's
        # compressor itself never runs here (DDP's hook compresses instead), nor do its buckets (DDP
        # buckets with its own bucket_cap_mb).
        if getattr(compressor, "name", None) == "bf16" and not torch.cuda.is_available():
            raise UsageError("the ddp-hvdbert-model peer runs dist.compression = bf16 with DDP's bf16_compress_hook, "
                             "which needs NCCL (CUDA); on Gloo use none, fp16 or powersgd")
        self.fp16_allreduce, self.compressor = fp16_allreduce, compressor
        return optimizer

    def broadcast_model_and_optimizer(self, model: torch.nn.Module, optimizer) -> None:
        for tensor in model.state_dict().values():
            torch_dist.broadcast(tensor, src=0)
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    torch_dist.broadcast(value, src=0)

    def broadcast_object(self, obj: Any, name: str) -> Any:
        holder = [obj]
        torch_dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def allgather_object(self, obj: Any, name: str) -> list:
        gathered = [None] * self.size
        torch_dist.all_gather_object(gathered, obj)
        return gathered

    def allreduce_sum(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        result = tensor.clone()
        torch_dist.all_reduce(result, op=torch_dist.ReduceOp.SUM)
        return result

    def allreduce_sum_async(self, tensor: torch.Tensor, name: str) -> Any:
        result = tensor.clone()
        return torch_dist.all_reduce(result, op=torch_dist.ReduceOp.SUM, async_op=True), result

    def wait(self, handle: Any) -> torch.Tensor:
        work, result = handle
        work.wait()
        return result

    def barrier(self, bounded: bool = True) -> None:
        torch_dist.barrier()

    def synchronize(self, optimizer) -> None:
        pass  # DDP has averaged the gradients by the end of the last backward

    @contextlib.contextmanager
    def skip_synchronize(self, optimizer) -> Iterator[None]:
        yield

    def set_accumulation_steps(self, optimizer, accumulation_steps: int) -> None:
        pass

    def elastic_run(self, fn, state_objects: dict, on_reset, before_sync=None):
        raise UsageError("the ddp-hvdbert-model peer has no elastic mode")

    def shutdown(self) -> None:
        torch_dist.destroy_process_group()


@cli_entry("hvdbert.bench.peers.ddp_model")
def main(argv: list[str] | None = None) -> int:
    from hvdbert.bench.cli import parse_args, worker_main

    args = parse_args(argv)
    if args.worker is None:
        raise UsageError("--worker RESULT.json is required (hvdbert.bench passes it)")
    return worker_main(args, TorchDDP(), system="ddp-hvdbert-model")


if __name__ == "__main__":
    sys.exit(main())
