"""Orchestration: each configuration in its own processes, the peers beside hvdbert, interleaved
repeats, and the rows and ratios that come out of them."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hvdbert.bench.flops import SHAPES
from hvdbert.config import Recipe, load_recipe

log = logging.getLogger("hvdbert.bench")

# The peers `--peers` runs beside hvdbert, as modules of this package (they run from an installed
# hvdbert, wherever the command is started):
# - hf: transformers' Trainer with run_mlm.py's data path, one process (as run_mlm.py is run);
# - ddp: what a user writes from PyTorch's DDP tutorial: BertForMaskedLM, run_mlm.py's data;
# - ddp-hvdbert-model: PyTorch DDP over Gloo running hvdbert's own model, data and step, so the
#   ratio to hvdbert isolates the communication layer (Horovod against DDP).
PEERS = ("hf", "ddp", "ddp-hvdbert-model")
PEER_MODULES = {"hf": "hvdbert.bench.peers.hf_trainer", "ddp": "hvdbert.bench.peers.ddp",
                "ddp-hvdbert-model": "hvdbert.bench.peers.ddp_model"}


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


def on_local_workers(command: list[str], workers: int) -> list[str]:
    """`command` as `workers` Horovod processes on this host over Gloo (the venv's horovodrun), or as
    it is for one worker."""
    if workers == 1:
        return command
    horovodrun = str(Path(sys.executable).parent / "horovodrun")
    return [horovodrun, "--gloo", "-np", str(workers), "-H", f"localhost:{workers}", *command]


def run_config(config: Config, args, recipe: Recipe, data_dir: Path, workdir: Path) -> dict:
    result = workdir / f"result-{len(list(workdir.iterdir()))}.json"
    steps_total = args.warmup_steps + args.steps
    sets = bench_overrides(args.shape, config.workers, steps_total, [*args.set, *config.sets], args.recipe)
    python = sys.executable
    # hvdbert's measured loop (and the DDP peer on hvdbert's model, which runs the same loop) take
    # the recipe; the other peers take a spec of the same shape, batch, length and threads.
    run_args = ["--recipe", args.recipe, "--data", str(data_dir), "--steps", str(args.steps),
                "--warmup-steps", str(args.warmup_steps), "--worker", str(result),
                *(["--compile"] if args.compile else []), *(a for s in sets for a in ("--set", s))]
    if config.system != "hvdbert" and config.system != "ddp-hvdbert-model":
        spec = workdir / f"spec-{config.system}-{config.workers}.json"
        spec.write_text(json.dumps(peer_spec(recipe, args)), encoding="utf-8")
    if config.system == "hvdbert":
        command = on_local_workers([python, "-m", "hvdbert.bench", *run_args], config.workers)
    elif config.system == "hf":
        command = [python, "-m", PEER_MODULES["hf"], "--spec", str(spec), "--data", str(data_dir),
                   "--result", str(result)]
    else:  # torch.distributed.run starts the DDP processes
        peer_args = (run_args if config.system == "ddp-hvdbert-model"
                     else ["--spec", str(spec), "--data", str(data_dir), "--result", str(result)])
        command = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                   str(config.workers), "-m", PEER_MODULES[config.system], *peer_args]
    log.info("bench: %s ...", config.key)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    completed = run_in_own_session(command, child_env(recipe.dist.threads_per_worker))
    if completed.returncode != 0 or not result.is_file():
        tail = (completed.stdout[-3000:] + completed.stderr[-3000:]).strip()
        raise RuntimeError(f"bench: {config.key} failed (exit {completed.returncode}): {' '.join(command)}\n{tail}")
    record = json.loads(result.read_text(encoding="utf-8"))
    # The 1-minute load average around the run: above the core count, other work shared the CPUs.
    record.update(label=config.label, wall_seconds=time.perf_counter() - started,
                  load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    log.info("bench: %s: %.2f seq/s, step %.3f s", config.key, record["seq_per_s"], record["step_seconds"])
    return record


def run_in_own_session(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run a configuration's processes (horovodrun or torch.distributed.run and their workers) in a
    session of their own and, when the benchmark stops early (SIGTERM, Ctrl-C, an error), end the whole
    session with it: killing the launcher alone would leave its workers running under init."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate()
    except BaseException:
        for stop in (signal.SIGTERM, signal.SIGKILL):  # SIGTERM lets launchers end their workers first
            try:
                os.killpg(process.pid, stop)
                process.wait(timeout=10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def peer_spec(recipe: Recipe, args) -> dict:
    """What the peer scripts need to run the same step: shape, batch, length, threads, precision,
    torch.compile (the Trainer's torch_compile; the DDP peer runs eager)."""
    return {
        "model": recipe.model,
        "micro_batch_size": recipe.batch.micro_batch_size,
        "seq_len": recipe.data.max_seq_len,
        "mask_prob": recipe.data.mask_prob,
        "threads": recipe.dist.threads_per_worker,
        "precision": recipe.train.precision,
        "compile": recipe.train.compile or args.compile,
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
            # the cost of a sequence in CPU time, this row's over the peer's: below 1, this row is cheaper
            row[f"cpu_vs_{peer}"] = (row["cpu_seconds_per_sequence"] / match["cpu_seconds_per_sequence"]
                                     if match else None)
    return rows


def per_round(configs: list[Config]) -> list[dict]:
    """seq/s, ratios to the peers and scaling efficiencies within each round of the interleaved
    repeats: on a shared machine the load changes between rounds, so these are the fair ratios."""
    rounds = []
    for k in range(min((len(c.results) for c in configs), default=0)):
        seq = {(c.label, c.workers): c.results[k]["seq_per_s"] for c in configs}
        cpu = {(c.label, c.workers): c.results[k]["cpu_seconds_per_sequence"] for c in configs}
        ratios = {}
        for (label, workers), value in seq.items():
            base = seq.get((label.split(" ")[0], 1))
            if workers > 1 and base:
                ratios[f"scaling_efficiency {label} x{workers}"] = value / (workers * base)
            for peer in PEERS:
                if label.startswith("hvdbert") and (peer, workers) in seq:
                    ratios[f"{label} x{workers} / {peer} x{workers}"] = value / seq[(peer, workers)]
                    # the step-cost ratio: CPU-seconds per sequence, which a load peak does not stretch
                    ratios[f"{label} x{workers} / {peer} x{workers} CPU-s per sequence"] = (
                        cpu[(label, workers)] / cpu[(peer, workers)])
        rounds.append({"seq_per_s": {f"{label} x{workers}": v for (label, workers), v in seq.items()},
                       "cpu_seconds_per_sequence": {f"{label} x{workers}": v for (label, workers), v in cpu.items()},
                       "ratios": ratios})
    return rounds


def ratio_ranges(rounds: list[dict]) -> dict[str, list[float]]:
    """[min, max] over the rounds of each ratio per_round computed: how far one round's figure can be
    trusted on this machine."""
    values: dict[str, list[float]] = {}
    for round_ in rounds:
        for name, value in round_["ratios"].items():
            values.setdefault(name, []).append(value)
    return {name: [min(found), max(found)] for name, found in values.items()}
