"""Peer: transformers' Trainer with run_mlm.py's recipe, timed step by step.

    python -m hvdbert.bench.peers.hf_trainer --spec SPEC.json --data DATA_DIR --result RESULT.json

SPEC (written by hvdbert.bench) gives the model fields, micro-batch, sequence length, threads,
precision, warm-up and timed steps. One process, as `python run_mlm.py` runs: Trainer's defaults
(AdamW, grad-norm clipping at 1.0, DataCollatorForLanguageModeling with mlm_probability 0.15).
"""
from __future__ import annotations

import json
import tempfile
import time

import torch

from hvdbert.bench.peers.data import peer_arguments


def main() -> int:
    args, spec = peer_arguments(__doc__)

    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    from hvdbert.bench.peers.data import model_from_spec, run_mlm_dataset, trainer_levers
    from hvdbert.bench.flops import (cpu_record, device_name, matmul_peak_flops, peak_memory_bytes, probe_dtype,
                                     training_flops_per_sequence)

    tokenizer, train_dataset = run_mlm_dataset(args.data, spec["seq_len"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    peak_flops = matmul_peak_flops(device, probe_dtype(spec["precision"]))
    torch.manual_seed(spec["seed"])
    model = model_from_spec(spec, tokenizer)
    warmup, steps, micro = spec["warmup_steps"], spec["steps"], spec["micro_batch_size"]

    class StepClock(TrainerCallback):
        """Wall and CPU time at each optimizer step's start and end (data loading included, as in hvdbert's)."""

        def __init__(self):
            self.begins, self.ends = [], []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begins.append((self._now(), time.process_time()))

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append((self._now(), time.process_time()))

        @staticmethod
        def _now() -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="hf-trainer-bench-") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=micro, max_steps=warmup + steps,
            learning_rate=5e-5, seed=spec["seed"], logging_strategy="no", save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=not cuda, dataloader_num_workers=0,
            **trainer_levers(spec["precision"], spec["compile"]),
        )
        collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=spec["mask_prob"])
        trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, data_collator=collator,
                          callbacks=[clock])
        trainer.train()
    peak_flops = max(peak_flops, matmul_peak_flops(device, probe_dtype(spec["precision"])))  # as hvdbert.bench
    start = clock.ends[warmup - 1] if warmup > 0 else clock.begins[0]
    (end, cpu_end) = clock.ends[warmup + steps - 1]
    elapsed, cpu_seconds = end - start[0], cpu_end - start[1]
    seq_per_s = steps * micro / elapsed
    flops_per_seq = training_flops_per_sequence(spec["model"], spec["seq_len"], spec["seq_len"])  # full head
    memory, memory_kind = peak_memory_bytes(device)
    record = {
        "system": "hf", "workers": 1, "backend": "none", "device": device_name(device),
        "precision": spec["precision"], "compiled": spec["compile"],
        "threads_per_worker": spec["threads"] if not cuda else None,
        "micro_batch_size": micro, "global_batch_size": micro, "seq_len": spec["seq_len"],
        "steps": steps, "warmup_steps": warmup, "seconds": elapsed,
        "seq_per_s": seq_per_s, "seq_per_s_per_worker": seq_per_s,
        "tokens_per_s": seq_per_s * spec["seq_len"],  # group_texts blocks have no padding
        "step_seconds": elapsed / steps, **cpu_record(cpu_seconds, steps, micro), "breakdown_seconds": None,
        "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
        "model_flops_per_seq": flops_per_seq, "model_flops_per_s": flops_per_seq * seq_per_s,
        "peak_flops": peak_flops, "mfu": flops_per_seq * seq_per_s / peak_flops,
        "optimizer": training_args.optim if isinstance(training_args.optim, str) else training_args.optim.value,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    args.result.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
