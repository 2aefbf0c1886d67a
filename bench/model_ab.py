"""Forward+backward of hvdbert's model against transformers' BertForMaskedLM, interleaved in one process.

    python -m bench.model_ab [--shape mini] [--micro-batch-size 32] [--seq-len 128] [--rounds 6]

On a shared machine, whole-run throughputs taken minutes apart see different loads; alternating the
two models pass by pass in one process (one thread) gives both the same conditions, so the ratio of
their times isolates the model-side levers (gather-first MLM head, no attention mask on packed data).
Same shape, same token ids, same masked positions; HF gets run_mlm.py's inputs (labels -100 except at
the masked positions, an all-ones attention mask, token_type_ids).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="mini")
    parser.add_argument("--micro-batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--predictions", type=int, default=20, help="masked positions per sequence")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from transformers import BertConfig, BertForMaskedLM

    from hvdbert.bench import SHAPES
    from hvdbert.model import build_model, pretraining_loss

    fields = {**SHAPES[args.shape], "max_position_embeddings": 512}
    torch.manual_seed(0)
    ours = build_model(fields, with_nsp=False).train()
    theirs = BertForMaskedLM._from_config(BertConfig(**fields), attn_implementation="sdpa").train()
    batch, length, predictions = args.micro_batch_size, args.seq_len, args.predictions
    ids = torch.randint(5, fields["vocab_size"], (batch, length))
    positions = torch.sort(torch.stack([torch.randperm(length - 2)[:predictions] + 1 for _ in range(batch)]), 1).values
    labels_at = ids.gather(1, positions)
    labels = torch.full((batch, length), -100).scatter_(1, positions, labels_at)

    def run_ours():
        pretraining_loss(ours, {"input_ids": ids, "masked_positions": positions, "masked_labels": labels_at}).loss.backward()

    def run_theirs():
        theirs(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
               labels=labels).loss.backward()

    seconds = {"hvdbert": [], "hf": []}
    for _ in range(args.rounds):
        for name, run in (("hvdbert", run_ours), ("hf", run_theirs)):
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    result = {name: {"median_s": statistics.median(v[1:]), "min_s": min(v), "all_s": [round(x, 3) for x in v]}
              for name, v in seconds.items()}
    result["ratio_median"] = result["hf"]["median_s"] / result["hvdbert"]["median_s"]
    result["ratio_min"] = result["hf"]["min_s"] / result["hvdbert"]["min_s"]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
