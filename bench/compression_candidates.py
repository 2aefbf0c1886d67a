"""Which gradient compressor: candidates side by side on one process, in one run.

    python -m bench.compression_candidates --recipe recipes/tiny.toml [--steps 100] [--set ...]

Each candidate trains the same run (pretrain's build_run: same seed, data, dropout) for --steps steps
on one process, where the compressor's collectives are identities: what is measured is what the
compression does to the gradient (the loss it reaches) and what it costs in compute (the seconds its
reduce takes per step), not the network. Bytes per step come from compression.compressed_bytes, for
the recipe's model and for BERT-base. Candidates:

- none, bf16, powersgd at ranks 1, 2, 4, 8 (hvdbert's own, dist.compression);
- ef-sign: scaled sign compression with error feedback (Karimireddy et al. 2019, EF-SignSGD; the
  compressor 1-bit Adam/LAMB apply to the momentum), 1 bit per element. Here only, to compare: signs
  do not add up in an allreduce, so on N workers it needs an allgather (N - 1 times its bytes per
  worker) or 1-bit Adam's two-stage exchange.

Prints one JSON line per candidate and a table. State the machine's load beside the figures.
"""
from __future__ import annotations

import argparse
import json
import time

import torch


class EfSign:
    """EF-SignSGD on one process: M = g + e; send (|M|_1 / d) sign(M) per tensor; e = M - that."""

    name = "ef-sign"
    stateful = False

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        self.errors = [torch.zeros_like(p) for p in self.params]

    def reduce(self, collectives) -> None:
        for p, e in zip(self.params, self.errors):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            m = p.grad + e
            compressed = m.abs().mean() * m.sign()
            e.copy_(m - compressed)
            p.grad.copy_(collectives.allreduce_mean(compressed, "ef_sign"))


class Timed:
    """A compressor with a clock on its reduce."""

    def __init__(self, inner):
        self.inner, self.seconds, self.stateful = inner, 0.0, False

    def reduce(self, collectives) -> None:
        start = time.perf_counter()
        self.inner.reduce(collectives)
        self.seconds += time.perf_counter() - start


def bert_base_shapes():
    from hvdbert.model import build_model

    with torch.device("meta"):
        model = build_model({"architecture": "bert"}, with_nsp=True)
    return [p.shape for p in model.parameters() if p.requires_grad]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--only", action="append", default=[], metavar="CANDIDATE",
                        help="run only these candidates (none is always run: the reference)")
    args = parser.parse_args()

    from hvdbert.compression import compressed_bytes
    from hvdbert.config import load_recipe
    from hvdbert.dist import SingleProcess
    from hvdbert.train import StepGuard, run_step

    candidates = [("none", []), ("bf16", ["dist.compression=bf16"])]
    candidates += [(f"powersgd rank {r}", ["dist.compression=powersgd", f"dist.powersgd_rank={r}"]) for r in (1, 2, 4, 8)]
    candidates += [("ef-sign", [])]
    if args.only:
        candidates = [c for c in candidates if c[0] == "none" or c[0] in args.only]
    base_shapes = bert_base_shapes()
    rows = []
    for label, overrides in candidates:
        from hvdbert.run import build_run

        recipe = load_recipe(args.recipe, [*args.set, f"train.max_steps={args.steps}", *overrides])
        dist = SingleProcess()
        run = build_run(recipe, None, dist)
        if label == "ef-sign":
            dist.compressor = run.compressor = EfSign(run.model.parameters())
        if dist.compressor is not None:
            dist.compressor = Timed(dist.compressor)
        run.broadcast_from_rank0()
        run.open_stream()
        losses, start = [], time.perf_counter()
        guard = StepGuard()
        for _ in range(args.steps):
            result = run_step(run, guard)
            losses.append(float(result.stats[0]) / run.plan.accumulation_steps)
        seconds = time.perf_counter() - start
        run.close_stream()
        shapes = [p.shape for p in run.model.parameters() if p.requires_grad]
        name = recipe.dist.wire_compression
        if label == "ef-sign":  # 1 bit per element and one float32 scale per tensor
            tiny_bytes = sum((s.numel() + 7) // 8 + 4 for s in shapes)
            base_bytes = sum((s.numel() + 7) // 8 + 4 for s in base_shapes)
        else:
            tiny_bytes = compressed_bytes(shapes, name, recipe.dist.powersgd_rank)
            base_bytes = compressed_bytes(base_shapes, name, recipe.dist.powersgd_rank)
        tail = losses[-10:]
        row = {"candidate": label, "steps": args.steps,
               "loss_last10": sum(tail) / len(tail),
               "bytes_ratio_vs_none_model": compressed_bytes(shapes, "none", 0) / tiny_bytes,
               "bytes_ratio_vs_none_bert_base": compressed_bytes(base_shapes, "none", 0) / base_bytes,
               "reduce_ms_per_step": 1000 * (dist.compressor.seconds if dist.compressor else 0.0) / args.steps,
               "step_ms": 1000 * seconds / args.steps}
        rows.append(row)
        print(json.dumps(row), flush=True)
    reference = rows[0]["loss_last10"]
    print("\n| candidate | bytes vs none (this model) | bytes vs none (BERT-base) | reduce ms/step | step ms "
          f"| loss, last 10 of {args.steps} steps | minus none's |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['candidate']} | 1/{row['bytes_ratio_vs_none_model']:.1f} | 1/{row['bytes_ratio_vs_none_bert_base']:.1f} "
              f"| {row['reduce_ms_per_step']:.1f} | {row['step_ms']:.0f} | {row['loss_last10']:.4f} "
              f"| {row['loss_last10'] - reference:+.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
