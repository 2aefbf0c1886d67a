"""The summary tools/gpu-check.sh ends with: each bench result of OUT (bench-PHASE-PRECISION.json,
written by `python -m hvdbert.bench --json`) as seq/s, MFU and peak memory, beside NVIDIA's published
per-GPU BERT-large pre-training throughput.

NVIDIA's figures: DeepLearningExamples, PyTorch/LanguageModeling/BERT, README, "Pre-training NVIDIA
DGX A100 (8x A100 80GB)", the 1-GPU rows (pytorch:21.11-py3 container; mixed precision is fp16 AMP):
https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/LanguageModeling/BERT#pre-training-nvidia-dgx-a100-8x-a100-80gb
NVIDIA publishes no H100 row for this model there; A100 is the nearest published per-GPU figure.

    python tools/gpu_check_report.py OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

# sequence length -> (batch per GPU TF32 and FP16, seq/s TF32, seq/s mixed precision), 1x A100 80GB
NVIDIA_A100 = {128: ("128 and 256", 317, 580), 512: ("16 and 32", 110, 210)}


def rows(out: Path) -> list[str]:
    lines = ["| shape | precision | micro-batch | seq/s | MFU | peak memory (GiB) | NVIDIA 1x A100 80GB: TF32 / fp16 AMP seq/s (batch) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for path in sorted(out.glob("bench-*-*.json")):
        result = json.loads(path.read_text())
        row = next(r for r in result["rows"] if r["system"] == "hvdbert")
        seq_len = row["seq_len"]
        batch, tf32, amp = NVIDIA_A100.get(seq_len, ("-", "-", "-"))
        model = f"{result.get('shape') or 'BERT-large'}, {row['parameters'] / 1e6:.0f}M parameters"
        lines.append(f"| {path.stem.split('-')[1]} ({model}, {seq_len} tokens) | {row['precision']} | "
                     f"{row['micro_batch_size']} | {row['seq_per_s']:.1f} | {row['mfu']:.1%} | "
                     f"{row['peak_memory_bytes'] / 2**30:.1f} | {tf32} / {amp} ({batch}) |")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python tools/gpu_check_report.py OUT (the directory tools/gpu-check.sh wrote)", file=sys.stderr)
        return 2
    lines = rows(Path(argv[0]))
    if len(lines) == 2:
        print(f"gpu-check: no bench-*-*.json in {argv[0]}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    print("NVIDIA: https://github.com/NVIDIA/DeepLearningExamples/tree/master/PyTorch/LanguageModeling/BERT"
          "#pre-training-nvidia-dgx-a100-8x-a100-80gb (MFU here: against the matmul peak measured on this GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
