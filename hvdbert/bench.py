"""Benchmark hvdbert's training step, side by side with the peers users compare it with.

    python -m hvdbert.bench --recipe RECIPE.toml [--shape mini|small|base|large] [--workers 1,2]
                            [--steps S] [--warmup-steps W] [--set section.key=value ...]
                            [--vary section.key=V1,V2 ...] [--peers hf,ddp] [--repeats R]
                            [--output DIR] [--json FILE] [--find-max-batch]

Each configuration runs in its own processes (one plain process for 1 worker, `horovodrun --gloo -np N`
for more), on the recipe's corpus (the embedded one unless --data is given), for W warm-up steps
that are not timed and S timed optimizer steps of one micro-batch per worker. The measured loop calls
hvdbert's own `train_step` on the model, optimizer and `BatchStream` that `pretrain` builds.

Reported per configuration (rank 0 writes it; the breakdown is averaged over ranks):
- seq_per_s, tokens_per_s (real tokens: packed sequences have no padding), step_seconds;
- breakdown: data_wait (waiting for the loader's next micro-batches), forward_backward (up to the
  last backward; Horovod's allreduces that overlap backward are inside it), gradient_sync (waiting
  for the allreduces still outstanding after backward), optimizer (unscale, clip, step, zero_grad);
- peak memory (CUDA: max allocated; CPU: the process's peak resident set);
- mfu = model FLOP/s / peak FLOP/s, with the peak measured by a matrix-multiply probe on every rank
  at the same time, on the same device, in the same run (see `training_flops_per_sequence`);
- allreduce bytes per step: the counted gradient payload (fp32: 4 bytes per trainable parameter,
  fp16 allreduce: 2) and the bytes each rank sends in a ring allreduce, 2 (N - 1) / N x payload.

--peers runs, in the same invocation and on the same corpus, model shape, micro-batch, sequence length
and thread count: `hf` = transformers' Trainer with run_mlm.py's data path (bench/hf_trainer.py),
`ddp` = plain PyTorch DistributedDataParallel over Gloo (bench/ddp.py) at every worker count.
--repeats interleaves the whole set R times (a shared machine is noisy); the median is reported.
Output: OUTPUT/bench.json, bench.md (the table) and bench.png (throughput and scaling efficiency).
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hvdbert.config import Recipe, load_recipe
from hvdbert.data.loader import BatchStream
from hvdbert.data.shards import PreparedData
from hvdbert.dist import SingleProcess, horovod_available, init_distributed
from hvdbert.errors import ArgumentParser, UsageError, cli_entry
from hvdbert.model import build_model, compile_model, count_parameters
from hvdbert.optim import build_optimizer, init_state
from hvdbert.plan import make_plan
from hvdbert.optim import lr_at, set_lr
from hvdbert.pretrain import choose_device, open_data, open_stream
from hvdbert.train import STAT_NAMES, Precision, StepGuard, dropout_seeds, train_step

log = logging.getLogger("hvdbert.bench")
REPO = Path(__file__).resolve().parents[1]

# Named model shapes (BertConfig fields). mini and small: Turc et al. 2019 ("Well-Read Students Learn
# Better"), with the 8192-token vocabulary of issue 5's reference measurement; base and large: Devlin
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
PEERS = ("hf", "ddp")
BREAKDOWN = ("data_wait", "forward_backward", "gradient_sync", "optimizer")


# --------------------------------------------------------------------------------------------------
# FLOPs and the peak


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
    fields = {**SHAPES["base"], **model_fields}
    hidden, layers = fields["hidden_size"], fields["num_hidden_layers"]
    intermediate, vocab = fields["intermediate_size"], fields["vocab_size"]
    encoder_weights = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    encoder = 6 * encoder_weights * seq_len + 12 * layers * hidden * seq_len * seq_len
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


# --------------------------------------------------------------------------------------------------
# The measured loop (one worker; runs under horovodrun for more than one)


class StepTimer:
    """The distributed layer with clocks on it: train_step calls synchronize() after its last
    backward (and wait() for the step guard's flags right after), so timing those calls splits a step
    into forward+backward, gradient sync and optimizer without changing train_step."""

    def __init__(self, dist: SingleProcess, device: torch.device):
        self.dist = dist
        self.device = device
        self.seconds = dict.fromkeys(BREAKDOWN, 0.0)
        self._mark = 0.0

    def __getattr__(self, name):
        return getattr(self.dist, name)

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def begin(self) -> None:
        self._mark = self._now()

    def synchronize(self, optimizer) -> None:
        now = self._now()
        self.seconds["forward_backward"] += now - self._mark
        self.dist.synchronize(optimizer)
        self._mark = self._now()
        self.seconds["gradient_sync"] += self._mark - now

    def wait(self, handle):
        # the step guard's flags, reduced together with the gradients: part of the sync wait
        now = self._now()
        self.seconds["optimizer"] += now - self._mark
        result = self.dist.wait(handle)
        self._mark = self._now()
        self.seconds["gradient_sync"] += self._mark - now
        return result

    def end(self) -> None:
        self.seconds["optimizer"] += self._now() - self._mark

    def reset(self) -> None:
        self.seconds = dict.fromkeys(BREAKDOWN, 0.0)


@dataclass
class Setup:
    """What pretrain builds for a run, built the same way for the benchmark."""

    dist: SingleProcess
    device: torch.device
    data: PreparedData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stream: BatchStream
    precision: Precision


def build(recipe: Recipe, data_dir: Path | None, dist: SingleProcess, steps: int) -> Setup:
    plan = make_plan(recipe, dist.size)
    device = choose_device(dist, recipe.train.precision)
    if device.type == "cpu":
        torch.set_num_threads(recipe.dist.threads_per_worker)
    data = open_data(data_dir, recipe, dist)
    torch.manual_seed(recipe.train.seed)
    model = build_model(recipe.model, with_nsp=data.has_nsp).to(device)
    optimizer = dist.wrap_optimizer(build_optimizer(model, recipe.optim, plan), model,
                                    plan.accumulation_steps, recipe.dist.fp16_allreduce)
    init_state(optimizer)
    dist.broadcast_model_and_optimizer(model, optimizer)
    stream = open_stream(data, recipe, plan, dist, 0, device)
    return Setup(dist, device, data, model, optimizer, stream, Precision.create(recipe.train.precision, device))


def measure(recipe: Recipe, setup: Setup, warmup_steps: int, steps: int) -> dict:
    """Run warm-up and timed steps; returns the record (complete on rank 0)."""
    dist, device = setup.dist, setup.device
    plan = make_plan(recipe, dist.size)
    timer = StepTimer(dist, device)
    setup.model.train()
    tokens_index = STAT_NAMES.index("tokens")

    dist.barrier()  # every rank probes at once, as every rank trains at once
    peak_flops = matmul_peak_flops(device, probe_dtype(recipe.train.precision))
    dist.barrier()

    tokens = torch.zeros((), dtype=torch.float64, device=device)
    guard = StepGuard()
    start = 0.0
    for step in range(warmup_steps + steps):
        if step == warmup_steps:  # the timed window starts here
            synchronize(device)
            timer.reset()
            tokens.zero_()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        wait_start = time.perf_counter()
        micro_batches = setup.stream.next_step()
        timer.seconds["data_wait"] += time.perf_counter() - wait_start
        # What train() does around train_step: the LR schedule, per-micro-batch dropout seeds and the
        # step guard (stop / non-finite flags, fused with the gradient allreduce).
        set_lr(setup.optimizer, lr_at(step, plan))
        seeds = dropout_seeds(recipe.train.seed, setup.stream.layout, step * plan.global_batch_size)
        timer.begin()
        stats = train_step(setup.model, setup.optimizer, micro_batches, timer, setup.precision,
                           recipe.train.grad_clip_norm, seeds, guard)
        timer.end()
        tokens += stats[tokens_index]
    synchronize(device)
    elapsed = time.perf_counter() - start
    # Probed again after the run, the best of the two: on a shared machine a probe that happened to
    # share its core with other work would understate the peak and overstate MFU.
    peak_flops = max(peak_flops, matmul_peak_flops(device, probe_dtype(recipe.train.precision)))

    # One reduction at the end: total tokens, summed breakdown and peaks of all ranks.
    local = torch.tensor([tokens.item(), peak_flops, *(timer.seconds[k] for k in BREAKDOWN)], dtype=torch.float64)
    totals = dist.allreduce_sum(local, name="bench").tolist()
    total_tokens, total_peak = totals[0], totals[1]
    breakdown = {k: v / dist.size / steps for k, v in zip(BREAKDOWN, totals[2:])}
    seq_per_s = steps * plan.global_batch_size / elapsed
    model_flops_per_seq = training_flops_per_sequence(recipe.model, plan.max_seq_len, plan.max_predictions_per_seq)
    trainable = sum(p.numel() for p in setup.model.parameters() if p.requires_grad)
    payload = trainable * (2 if recipe.dist.fp16_allreduce else 4) if dist.size > 1 else 0
    memory, memory_kind = peak_memory_bytes(device)
    return {
        "system": "hvdbert",
        "workers": dist.size,
        "backend": dist.backend,
        "device": device_name(device),
        "precision": recipe.train.precision,
        "threads_per_worker": recipe.dist.threads_per_worker if device.type == "cpu" else None,
        "micro_batch_size": plan.micro_batch_size,
        "global_batch_size": plan.global_batch_size,
        "seq_len": plan.max_seq_len,
        "steps": steps,
        "warmup_steps": warmup_steps,
        "seconds": elapsed,
        "seq_per_s": seq_per_s,
        "seq_per_s_per_worker": seq_per_s / dist.size,
        "tokens_per_s": total_tokens / elapsed,
        "step_seconds": elapsed / steps,
        "breakdown_seconds": breakdown,
        "breakdown_sum_seconds": sum(breakdown.values()),
        "peak_memory_bytes": memory,
        "peak_memory_kind": memory_kind,
        "model_flops_per_seq": model_flops_per_seq,
        "model_flops_per_s": model_flops_per_seq * seq_per_s,
        "peak_flops_per_worker": total_peak / dist.size,
        "peak_flops": total_peak,
        "mfu": model_flops_per_seq * seq_per_s / total_peak,
        "parameters": count_parameters(setup.model),
        "trainable_parameters": trainable,
        "fp16_allreduce": recipe.dist.fp16_allreduce,
        "cycle_time_ms": recipe.dist.cycle_time_ms,
        "fusion_threshold_mb": recipe.dist.fusion_threshold_mb,
        "allreduce_payload_bytes_per_step": payload,
        "allreduce_wire_bytes_per_rank_per_step": payload * 2 * (dist.size - 1) / dist.size,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def find_max_batch(recipe: Recipe, data_dir: Path | None, dist: SingleProcess) -> dict:
    """The largest micro-batch for which two training steps fit in GPU memory: double until CUDA
    runs out of memory, then bisect between the last fit and the first failure."""
    def fits(micro: int) -> bool:
        trial = dataclasses.replace(recipe, batch=dataclasses.replace(
            recipe.batch, micro_batch_size=micro, global_batch_size=micro * dist.size))
        setup = None
        try:
            setup = build(trial, data_dir, dist, steps=2)
            for _ in range(2):
                train_step(setup.model, setup.optimizer, setup.stream.next_step(), dist, setup.precision,
                           trial.train.grad_clip_norm)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            if setup is not None:
                setup.stream.close()
            del setup
            gc.collect()
            torch.cuda.empty_cache()

    fit, fail, micro = 0, 0, 8
    while micro <= 1 << 16:
        if not fits(micro):
            fail = micro
            break
        fit, micro = micro, micro * 2
    while fail and fail - fit > max(1, fit // 16):
        middle = (fit + fail) // 2
        fit, fail = (middle, fail) if fits(middle) else (fit, middle)
    return {"max_micro_batch_size": fit, "first_failing_micro_batch_size": fail or None,
            "device": device_name(torch.device("cuda")), "precision": recipe.train.precision,
            "seq_len": recipe.data.max_seq_len}


# --------------------------------------------------------------------------------------------------
# Orchestration: one configuration per set of processes, the peers beside hvdbert


@dataclass
class Config:
    system: str  # hvdbert | hf | ddp
    workers: int
    label: str  # e.g. "hvdbert" or "hvdbert dist.fp16_allreduce=true"
    sets: list[str] = field(default_factory=list)  # extra recipe overrides (variants)
    results: list[dict] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.label} x{self.workers}"


def bench_overrides(shape: str | None, workers: int, steps_total: int,
                    user_sets: list[str], recipe_path: str) -> list[str]:
    """--set values that turn a recipe into a benchmark run: one micro-batch per worker per step."""
    sets = [f"model.{k}={v}" for k, v in SHAPES[shape].items()] if shape else []
    sets += user_sets
    recipe = load_recipe(recipe_path, sets)
    micro = recipe.batch.micro_batch_size
    return sets + [f"train.max_steps={steps_total}", f"batch.global_batch_size={micro * workers}",
                   "batch.scaling=\"fixed-global\"", "train.progress_bar=false"]


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.pop("HOROVOD_RANK", None)
    return env


def run_config(config: Config, args, recipe: Recipe, data_dir: Path, workdir: Path) -> dict:
    result = workdir / f"result-{len(list(workdir.iterdir()))}.json"
    steps_total = args.warmup_steps + args.steps
    sets = bench_overrides(args.shape, config.workers, steps_total, [*args.set, *config.sets], args.recipe)
    python = sys.executable
    if config.system == "hvdbert":
        command = [python, "-m", "hvdbert.bench", "--recipe", args.recipe, "--data", str(data_dir),
                   "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--worker", str(result),
                   *(["--compile"] if args.compile else [])]
        for s in sets:
            command += ["--set", s]
        if config.workers > 1:
            horovodrun = str(Path(python).parent / "horovodrun")
            command = [horovodrun, "--gloo", "-np", str(config.workers), "-H", f"localhost:{config.workers}",
                       *command]
    else:
        spec = workdir / f"spec-{config.system}-{config.workers}.json"
        spec.write_text(json.dumps(peer_spec(recipe, args)), encoding="utf-8")
        peer_args = ["--spec", str(spec), "--data", str(data_dir), "--result", str(result)]
        if config.system == "hf":
            command = [python, "-m", "bench.hf_trainer", *peer_args]
        else:
            command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       str(config.workers), "-m", "bench.ddp", *peer_args]
    log.info("bench: %s ...", config.key)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, env=child_env(recipe.dist.threads_per_worker),
                               capture_output=True, text=True)
    if completed.returncode != 0 or not result.is_file():
        tail = (completed.stdout[-3000:] + completed.stderr[-3000:]).strip()
        raise RuntimeError(f"bench: {config.key} failed (exit {completed.returncode}): {' '.join(command)}\n{tail}")
    record = json.loads(result.read_text(encoding="utf-8"))
    # The 1-minute load average around the run: above the core count, other work shared the CPUs.
    record.update(label=config.label, wall_seconds=time.perf_counter() - started,
                  load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    log.info("bench: %s: %.2f seq/s, step %.3f s", config.key, record["seq_per_s"], record["step_seconds"])
    return record


def peer_spec(recipe: Recipe, args) -> dict:
    """What the peer scripts need to run the same step: shape, batch, length, threads, precision."""
    return {
        "model": recipe.model,
        "micro_batch_size": recipe.batch.micro_batch_size,
        "seq_len": recipe.data.max_seq_len,
        "mask_prob": recipe.data.mask_prob,
        "threads": recipe.dist.threads_per_worker,
        "precision": recipe.train.precision,
        "seed": recipe.train.seed,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
    }


def median_record(results: list[dict]) -> dict:
    """The repeat with the median seq/s (the lower one of an even count), all repeats' seq/s beside it."""
    ordered = sorted(results, key=lambda r: r["seq_per_s"])
    record = dict(ordered[(len(ordered) - 1) // 2])
    record["seq_per_s_repeats"] = [r["seq_per_s"] for r in results]
    return record


def summarise(configs: list[Config]) -> list[dict]:
    rows = [median_record(c.results) for c in configs if c.results]
    single = {r["system"]: r for r in rows if r["workers"] == 1 and r["label"] == r["system"]}
    for row in rows:
        base = single.get(row["system"])  # hvdbert's variants scale against plain hvdbert at 1
        row["scaling_efficiency"] = (row["seq_per_s"] / (row["workers"] * base["seq_per_s"])
                                     if base and base["seq_per_s"] > 0 else None)
    for row in rows:
        for peer in PEERS:
            match = next((r for r in rows if r["system"] == peer and r["workers"] == row["workers"]), None)
            row[f"vs_{peer}"] = row["seq_per_s"] / match["seq_per_s"] if match else None
    return rows


def per_round(configs: list[Config]) -> list[dict]:
    """seq/s, ratios to the peers and scaling efficiencies within each round of the interleaved
    repeats: on a shared machine the load changes between rounds, so these are the fair ratios."""
    rounds = []
    for k in range(min((len(c.results) for c in configs), default=0)):
        seq = {(c.label, c.workers): c.results[k]["seq_per_s"] for c in configs}
        ratios = {}
        for (label, workers), value in seq.items():
            base = seq.get((label.split(" ")[0], 1))
            if workers > 1 and base:
                ratios[f"scaling_efficiency {label} x{workers}"] = value / (workers * base)
            for peer in PEERS:
                if label.startswith("hvdbert") and (peer, workers) in seq:
                    ratios[f"{label} x{workers} / {peer} x{workers}"] = value / seq[(peer, workers)]
        rounds.append({"seq_per_s": {f"{label} x{workers}": v for (label, workers), v in seq.items()},
                       "ratios": ratios})
    return rounds


# --------------------------------------------------------------------------------------------------
# Report: JSON, markdown table, plot

SYSTEM_NAMES = {"hvdbert": "hvdbert (Horovod)", "hf": "HF Trainer (run_mlm)", "ddp": "PyTorch DDP (Gloo)"}


def _fmt(value, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _times(ratio) -> str:
    return "–" if ratio is None else f"{ratio:.2f}x"


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| system | workers | seq/s | tokens/s | step ms | data wait ms | fwd+bwd ms | grad sync ms | "
        "optimizer ms | peak mem MiB | MFU | scaling eff. | vs HF Trainer | vs DDP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = SYSTEM_NAMES[r["system"]] + r["label"][len(r["system"]):]
        b = r.get("breakdown_seconds") or {}
        ms = lambda key: _fmt(b[key] * 1000 if key in b and b[key] is not None else None, ".0f")  # noqa: E731
        lines.append(
            f"| {name} | {r['workers']} | {_fmt(r['seq_per_s'], '.2f')} | {_fmt(r['tokens_per_s'], ',.0f')} | "
            f"{_fmt(r['step_seconds'] * 1000, '.0f')} | {ms('data_wait')} | {ms('forward_backward')} | "
            f"{ms('gradient_sync')} | {ms('optimizer')} | {_fmt(r['peak_memory_bytes'] / 2**20, '.0f')} | "
            f"{_fmt(r.get('mfu') and 100 * r['mfu'], '.1f')}% | {_fmt(r['scaling_efficiency'], '.2f')} | "
            f"{_times(r['vs_hf'])} | {_times(r['vs_ddp'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["label"] for r in rows):
        series = sorted((r for r in rows if r["label"] == label), key=lambda r: r["workers"])
        name = SYSTEM_NAMES[series[0]["system"]] + label[len(series[0]["system"]):]
        workers = [r["workers"] for r in series]
        left.plot(workers, [r["seq_per_s"] for r in series], marker="o", label=name)
        efficiency = [(r["workers"], r["scaling_efficiency"]) for r in series if r["scaling_efficiency"]]
        if efficiency:
            right.plot(*zip(*efficiency), marker="o", label=name)
    all_workers = sorted({r["workers"] for r in rows})
    left.set(xlabel="workers", ylabel="sequences / s", title="Throughput", xticks=all_workers)
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    right.set(xlabel="workers", ylabel="seq/s at N / (N x seq/s at 1)", title="Scaling efficiency",
              xticks=all_workers, ylim=(0, 1.1))
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine_description() -> dict:
    return {
        "device": "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


# --------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None):
    parser = ArgumentParser(prog="python -m hvdbert.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, help="recipe TOML file (see recipes/ and bench/recipes/)")
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a named model shape over the recipe's [model]")
    parser.add_argument("--data", type=Path, help="prepared data directory (default: embedded corpus)")
    parser.add_argument("--workers", default="1", help="worker counts, comma-separated (default 1)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--vary", action="append", default=[], metavar="SECTION.KEY=V1,V2",
                        help="also run hvdbert at more than 1 worker with each value (repeatable)")
    parser.add_argument("--peers", default="", help="comma-separated peers to run alongside: hf, ddp")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of the whole set")
    parser.add_argument("--output", type=Path, help="directory for bench.json/.md/.png")
    parser.add_argument("--json", type=Path, help="also write the JSON result here")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoder and the MLM head (nn.Module.compile, in place)")
    parser.add_argument("--find-max-batch", action="store_true",
                        help="report the largest micro-batch that fits (CUDA only) instead of timing")
    parser.add_argument("--worker", type=Path, help=argparse_hidden())
    args = parser.parse_args(argv)
    try:
        args.worker_counts = sorted({int(w) for w in args.workers.split(",")})
    except ValueError:
        raise UsageError(f"--workers {args.workers!r}: expected worker counts like 2 or 1,2") from None
    if min(args.worker_counts) < 1:
        raise UsageError(f"--workers {args.workers!r}: worker counts must be at least 1")
    if args.steps < 1 or args.warmup_steps < 0 or args.repeats < 1:
        raise UsageError("--steps and --repeats must be at least 1 and --warmup-steps at least 0")
    args.peer_names = [p for p in args.peers.split(",") if p]
    unknown = [p for p in args.peer_names if p not in PEERS]
    if unknown:
        raise UsageError(f"--peers: unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}")
    for vary in args.vary:
        if "=" not in vary or "." not in vary.split("=", 1)[0]:
            raise UsageError(f"--vary {vary!r}: expected section.key=V1,V2, e.g. --vary dist.cycle_time_ms=1,10")
    return args


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS  # internal: run the measured loop in this process, write the record here


def worker_main(args) -> int:
    recipe = load_recipe(args.recipe, args.set)
    dist = init_distributed(recipe.dist)
    logging.basicConfig(level=logging.WARNING, format=f"[rank {dist.rank}] %(message)s", force=True)
    setup = build(recipe, args.data, dist, args.warmup_steps + args.steps)
    compiled = args.compile or recipe.train.compile
    if compiled:
        compile_model(setup.model)
    try:
        record = measure(recipe, setup, args.warmup_steps, args.steps)
        record["compiled"] = compiled
    finally:
        setup.stream.close()
    if dist.rank == 0:
        args.worker.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    dist.shutdown()
    return 0


@cli_entry("hvdbert.bench")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    shape_sets = [f"model.{k}={v}" for k, v in SHAPES[args.shape].items()] if args.shape else []
    recipe = load_recipe(args.recipe, [*shape_sets, *args.set])  # bad recipes fail before anything runs
    if args.find_max_batch and not torch.cuda.is_available():
        raise UsageError("--find-max-batch needs a CUDA GPU (it searches for the largest micro-batch "
                         "before CUDA runs out of memory); on CPU the bench JSON's peak_memory_bytes "
                         "gives the resident memory of a run instead")
    for workers in args.worker_counts:
        make_plan(load_recipe(args.recipe, bench_overrides(args.shape, workers, 1, args.set, args.recipe)),
                  workers)
    data = open_data(args.data, recipe, SingleProcess())  # prepared once, before any worker starts
    if args.find_max_batch:
        result = find_max_batch(recipe, data.directory, init_distributed(recipe.dist))
        print(json.dumps(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0

    multi = [w for w in args.worker_counts if w > 1]
    if multi and not horovod_available():
        log.warning("bench: Horovod is not installed: skipping hvdbert at %s workers", multi)
    configs = [Config("hvdbert", w, "hvdbert") for w in args.worker_counts if w == 1 or horovod_available()]
    for vary in args.vary:
        key, values = vary.split("=", 1)
        for value in values.split(","):
            configs += [Config("hvdbert", w, f"hvdbert {key}={value}", [f"{key}={value}"]) for w in multi
                        if horovod_available()]
    for peer in args.peer_names:
        counts = [1] if peer == "hf" else args.worker_counts  # Trainer: one process, as run_mlm.py is run
        configs += [Config(peer, w, peer) for w in counts]

    output = args.output or Path("runs") / f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    output.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hvdbert-bench-") as workdir:
        for _ in range(args.repeats):  # interleaved: a noisy machine affects every configuration alike
            for config in configs:
                config.results.append(run_config(config, args, recipe, data.directory, Path(workdir)))
    rows = summarise(configs)

    top = max((r for r in rows if r["label"] == "hvdbert"), key=lambda r: r["workers"])
    command = "python -m hvdbert.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {
        **{k: top[k] for k in ("workers", "seq_per_s", "tokens_per_s", "mfu", "step_seconds", "breakdown_seconds",
                               "scaling_efficiency", "peak_memory_bytes", "vs_hf", "vs_ddp")},
        "command": command,
        "recipe": args.recipe,
        "shape": args.shape,
        "model": recipe.model,
        "machine": machine_description(),
        "flops_formula": "per sequence: 6 x L x (4 H^2 + 2 H I) x S + 12 x L x H x S^2 + 6 x (H^2 + H V) x P, "
        "P = max_predictions_per_seq (hvdbert's gather-first head) or S (full head)",
        "rows": rows,
        "rounds": per_round(configs),
    }
    (output / "bench.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(rows)
    if args.repeats > 1:
        table += "\nRatios within each round of the interleaved repeats:\n\n"
        for number, round_ in enumerate(summary["rounds"], 1):
            table += f"- round {number}: " + ", ".join(f"{k} {v:.2f}" for k, v in round_["ratios"].items()) + "\n"
    (output / "bench.md").write_text(table, encoding="utf-8")
    shape = args.shape or Path(args.recipe).stem
    plot(rows, output / "bench.png", f"{shape}, micro-batch {recipe.batch.micro_batch_size}, seq "
         f"{recipe.data.max_seq_len}, {recipe.train.precision}, {summary['machine']['device']}")
    print(table, end="")
    print(f"bench: wrote {output}/bench.json, bench.md, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
