"""FLOPs of a training pass and the peak they are measured against (MFU), timing and memory helpers."""
from __future__ import annotations

import os
import platform
import resource
import time

import torch

from hvdbert import families

# Named model shapes (BertConfig fields). mini and small: Turc et al. 2019 ("Well-Read Students Learn
# Better"), with an 8192-token vocabulary (docs/performance.md's CPU measurements); base and large: Devlin
# et al. 2018 with NVIDIA's vocabulary padded to a multiple of 8.
SHAPES = {
    "mini": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=1024),
    "small": dict(vocab_size=8192, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                  intermediate_size=2048),
    "base": dict(vocab_size=30528, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    "large": dict(vocab_size=30528, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                  intermediate_size=4096),
}
def training_flops_per_sequence(model_fields: dict, seq_len: int, head_positions: int) -> float:
    """Model FLOPs of one training pass (forward + backward = 3 x forward) over one sequence.

    Per token and layer the encoder multiplies by 4 H^2 (Q, K, V, output) + 2 H I (feed-forward)
    weights: 2 FLOPs per multiply-add, x3 for training, gives 6 x (encoder weights) per token. The
    attention scores and their weighted sum (QK^T, AV) add 2 x 2 x S x H per token and layer forward,
    12 x L x H x S with backward. The MLM head (transform H^2 + decoder H x V) is counted at
    `head_positions` positions per sequence: all S for a full head (HF's BertForMaskedLM), the
    max_predictions_per_seq gathered slots for hvdbert's gather-first head, which is the work it
    really does. Embedding lookups, biases, LayerNorm and softmax are not counted (standard 6N rule).
    """
    if families.family_of(model_fields).name == "modernbert":
        return modernbert_training_flops_per_sequence(model_fields, seq_len, head_positions)
    fields = {**SHAPES["base"], **model_fields}
    hidden, layers = fields["hidden_size"], fields["num_hidden_layers"]
    intermediate, vocab = fields["intermediate_size"], fields["vocab_size"]
    encoder_weights = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    encoder = 6 * encoder_weights * seq_len + 12 * layers * hidden * seq_len * seq_len
    head = 6 * (hidden * hidden + hidden * vocab) * head_positions
    return float(encoder + head)


def modernbert_training_flops_per_sequence(model_fields: dict, seq_len: int, head_positions: int) -> float:
    """Model FLOPs of one ModernBERT training pass over one sequence, counted as for BERT (6 x weights
    per token, 12 x H x keys per token and layer for attention), with ModernBERT's real work:

    - weights per layer: Wqkv (3 H^2) + Wo (H^2) + GeGLU's Wi (H x 2I: gate and value) + Wo (I x H);
    - attention keys per query: S in the global layers, the sliding window's 2 x (local_attention // 2)
      + 1 keys (at most S) in the others, as transformers' ModernBERT masks them;
    - the head (dense H^2 + decoder H x V) at `head_positions` positions: the gathered masked slots
      for hvdbert's gather-first head, all S for transformers' dense head.
    """
    config = families.build_config(families.with_token_ids(model_fields, {"pad": 0, "cls": 0, "sep": 0}))
    hidden, intermediate, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    window_keys = min(seq_len, 2 * (config.local_attention // 2) + 1)
    weights_per_layer = 4 * hidden * hidden + 3 * hidden * intermediate
    encoder = 0
    for layer_type in config.layer_types:
        keys = seq_len if layer_type == "full_attention" else window_keys
        encoder += 6 * weights_per_layer * seq_len + 12 * hidden * seq_len * keys
    head = 6 * (hidden * hidden + hidden * vocab) * head_positions
    return float(encoder + head)


def probe_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best FLOP/s of square matrix multiplies on `device`: the denominator of MFU.

    n = 1024 on CPU (one matmul takes tens of ms on one thread), 8192 on CUDA (large enough for the
    tensor cores to reach their sustained rate)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    flops = 2.0 * n**3
    best, deadline = 0.0, time.perf_counter() + seconds
    torch.matmul(a, b)  # warm-up: kernel selection, page faults
    while True:
        repeats = 10 if device.type == "cuda" else 1
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
        best = max(best, repeats * flops / elapsed)
        if time.perf_counter() > deadline:
            return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a host sync, only at timing boundaries


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
