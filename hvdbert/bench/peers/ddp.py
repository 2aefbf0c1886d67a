"""Peer: a plain PyTorch DistributedDataParallel loop (Gloo on CPU, NCCL on GPU).

    python -m torch.distributed.run --standalone --nproc-per-node N -m hvdbert.bench.peers.ddp \
        --spec SPEC.json --data DATA_DIR --result RESULT.json

What a user writes from the PyTorch DDP tutorial: transformers' BertForMaskedLM, run_mlm.py's data
(group_texts blocks, DataCollatorForLanguageModeling) split by DistributedSampler, torch AdamW,
gradient clipping at 1.0 (as Trainer). Rank 0 writes the record; the breakdown has no separate
gradient sync because DDP's bucketed allreduce overlaps backward and is waited for inside it.
"""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from hvdbert.bench.peers.data import peer_arguments


def main() -> int:
    args, spec = peer_arguments(__doc__)

    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, DistributedSampler
    from transformers import DataCollatorForLanguageModeling

    from hvdbert.bench.peers.data import model_from_spec, run_mlm_dataset
    from hvdbert.bench.flops import (cpu_record, device_name, matmul_peak_flops, peak_memory_bytes, probe_dtype,
                                     training_flops_per_sequence)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    tokenizer, dataset = run_mlm_dataset(args.data, spec["seq_len"])
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=spec["mask_prob"])
    micro, warmup, steps = spec["micro_batch_size"], spec["warmup_steps"], spec["steps"]
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=spec["seed"])
    loader = DataLoader(dataset, batch_size=micro, sampler=sampler, collate_fn=collator, drop_last=True)

    dist.barrier()
    peak_flops = matmul_peak_flops(device, probe_dtype(spec["precision"]))
    dist.barrier()
    torch.manual_seed(spec["seed"])
    model = model_from_spec(spec, tokenizer).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    autocast = torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(
        spec["precision"], torch.float32), enabled=spec["precision"] != "fp32")
    scaler = torch.amp.GradScaler("cuda") if spec["precision"] == "fp16" else None

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = batches()
    seconds = {"data_wait": 0.0, "forward_backward": 0.0, "gradient_sync": 0.0, "optimizer": 0.0}
    start, cpu_start = now(), time.process_time()
    for step in range(warmup + steps):
        if step == warmup:
            seconds = dict.fromkeys(seconds, 0.0)
            seconds["gradient_sync"] = None
            start, cpu_start = now(), time.process_time()
        t0 = time.perf_counter()
        batch = {k: v.to(device, non_blocking=True) for k, v in next(stream).items()}
        t1 = now()
        with autocast:
            loss = ddp(**batch).loss
        (scaler.scale(loss) if scaler else loss).backward()
        t2 = now()
        if scaler:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = now()
        if step >= warmup:
            seconds["data_wait"] += t1 - t0
            seconds["forward_backward"] += t2 - t1
            seconds["optimizer"] += t3 - t2
    elapsed, cpu_seconds = now() - start, time.process_time() - cpu_start
    peak_flops = max(peak_flops, matmul_peak_flops(device, probe_dtype(spec["precision"])))  # as hvdbert.bench
    seq_per_s = steps * micro * world / elapsed
    flops_per_seq = training_flops_per_sequence(spec["model"], spec["seq_len"], spec["seq_len"])  # full head
    totals = torch.tensor([peak_flops, cpu_seconds], dtype=torch.float64)
    dist.all_reduce(totals)
    total_peak, total_cpu_seconds = totals[0], totals[1].item()
    memory, memory_kind = peak_memory_bytes(device)
    if rank == 0:
        record = {
            "system": "ddp", "workers": world, "backend": dist.get_backend(), "device": device_name(device),
            "precision": spec["precision"], "threads_per_worker": spec["threads"] if not cuda else None,
            "micro_batch_size": micro, "global_batch_size": micro * world, "seq_len": spec["seq_len"],
            "steps": steps, "warmup_steps": warmup, "seconds": elapsed,
            "seq_per_s": seq_per_s, "seq_per_s_per_worker": seq_per_s / world,
            "tokens_per_s": seq_per_s * spec["seq_len"],  # group_texts blocks have no padding
            "step_seconds": elapsed / steps, **cpu_record(total_cpu_seconds, steps, micro * world),
            "breakdown_seconds": {k: (v / steps if v is not None else None) for k, v in seconds.items()},
            "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
            "model_flops_per_seq": flops_per_seq, "model_flops_per_s": flops_per_seq * seq_per_s,
            "peak_flops": total_peak.item(), "mfu": flops_per_seq * seq_per_s / total_peak.item(),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        args.result.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
