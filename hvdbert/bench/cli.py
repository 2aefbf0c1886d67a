"""Benchmark hvdbert's training step, side by side with the peers users compare it with.

    python -m hvdbert.bench --recipe RECIPE.toml [--shape mini|small|base|large] [--workers 1,2]
                            [--steps S] [--warmup-steps W] [--set section.key=value ...]
                            [--vary section.key=V1,V2 ...] [--peers hf,ddp,ddp-hvdbert-model] [--repeats R]
                            [--output DIR] [--json FILE] [--find-max-batch]
    python -m hvdbert.bench --recipe RECIPE.toml --hosts 2,4 --link 1gbit,200mbit,100mbit [...]
        (the shaped-cluster benchmark: one worker per namespaced host, links of a set rate; bench/cluster.py)

Each configuration runs in its own processes (one plain process for 1 worker, `horovodrun --gloo -np N`
for more), on the recipe's corpus (the embedded one unless --data is given), for W warm-up steps
that are not timed and S timed optimizer steps of one micro-batch per worker. The measured loop runs
hvdbert's own step (`train.run_step`, the one `train()` runs) on the `Run` that `pretrain` builds.

Reported per configuration (rank 0 writes it; the breakdown is averaged over ranks):
- seq_per_s, tokens_per_s (real tokens: packed sequences have no padding), step_seconds;
- cpu_seconds_per_step and cpu_seconds_per_sequence: the CPU time (time.process_time) of the timed
  steps summed over the measured processes, for every system; ratios between systems are taken from
  it within each round (cpu_vs_PEER, and per round), since a load peak on a shared machine stretches
  wall time but not CPU time, and bench.json's ratio_ranges give each ratio's range over the rounds;
- breakdown: data_wait (waiting for the loader's next micro-batches), forward_backward (up to the
  last backward; Horovod's allreduces that overlap backward are inside it), gradient_sync (waiting
  for the allreduces still outstanding after backward), optimizer (unscale, clip, step, zero_grad);
- peak memory (CUDA: max allocated; CPU: the process's peak resident set);
- mfu = model FLOP/s / peak FLOP/s, with the peak measured by a matrix-multiply probe on every rank
  at the same time, on the same device, in the same run (see `training_flops_per_sequence`);
- allreduce bytes per step: the counted gradient payload (fp32: 4 bytes per trainable parameter,
  fp16 or bf16: 2, powersgd: its factors; compression.compressed_bytes) and the bytes each rank sends
  in a ring allreduce, 2 (N - 1) / N x payload (bf16, allgathered: N - 1 x payload).

--peers runs, in the same invocation and on the same corpus, model shape, micro-batch, sequence length
and thread count: `hf` = transformers' Trainer with run_mlm.py's data path (peers/hf_trainer.py),
`ddp` = plain PyTorch DistributedDataParallel over Gloo on transformers' BertForMaskedLM
(peers/ddp.py), `ddp-hvdbert-model` = DDP over Gloo on hvdbert's own model, data and step
(peers/ddp_model.py): its ratio to hvdbert is Horovod against DDP, nothing else. The DDP peers run
at every worker count, the Trainer on one process.
--repeats interleaves the whole set R times (a shared machine is noisy); the median is reported. With
--hosts, each round measures its own references and runs the configurations in alternate order
(forward, then backward: ABBA), so a drifting load falls on every configuration alike.
Output: OUTPUT/bench.json, bench.md (the table) and bench.png (throughput and scaling efficiency).
"""
from __future__ import annotations

import datetime
import json
import logging
import signal
import sys
import tempfile
from pathlib import Path

import torch

from hvdbert.bench.flops import SHAPES
from hvdbert.bench.measure import build_measured_run, find_max_batch, measure
from hvdbert.bench.orchestrate import (PEERS, Config, bench_overrides, per_round, ratio_ranges, run_config,
                                      summarise)
from hvdbert.bench.report import machine_description, markdown_table, plot
from hvdbert.config import load_recipe
from hvdbert.dist import Distributed, SingleProcess, horovod_available, init_distributed
from hvdbert.errors import ArgumentParser, UsageError, cli_entry
from hvdbert.plan import make_plan
from hvdbert.run import open_data

log = logging.getLogger("hvdbert.bench")


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
    parser.add_argument("--hosts", help="shaped-cluster benchmark (root): host counts, e.g. 2,4 (bench/cluster.py)")
    parser.add_argument("--link", help="with --hosts: link rates, e.g. 1gbit,200mbit,100mbit")
    parser.add_argument("--overlap", type=float, help="with --hosts: the scaling model's overlap for its "
                        "predictions (default: ClusterConfig's)")
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
    run_mlm_peers = [p for p in args.peer_names if p in ("hf", "ddp")]
    if args.data and run_mlm_peers:
        raise UsageError(f"--peers {run_mlm_peers[0]} reads the embedded corpus through run_mlm.py's data path, "
                         "not --data; drop --data, or compare with --peers ddp-hvdbert-model")
    if (args.hosts is None) != (args.link is None):
        raise UsageError("--hosts and --link go together: e.g. --hosts 2,4 --link 1gbit,100mbit")
    if args.hosts is not None:
        from hvdbert.bench.cluster import parse_hosts, parse_links

        args.host_counts, args.links = parse_hosts(args.hosts), parse_links(args.link)
        if args.peer_names or args.workers != "1" or args.find_max_batch or args.compile:
            raise UsageError("--hosts runs one worker per host, hvdbert and the DDP peer on hvdbert's model; "
                             "drop --workers, --peers, --find-max-batch and --compile")
    if args.overlap is not None and not 0 <= args.overlap <= 1:
        raise UsageError(f"--overlap {args.overlap}: must be from 0 to 1")
    for vary in args.vary:
        if "=" not in vary or "." not in vary.split("=", 1)[0]:
            raise UsageError(f"--vary {vary!r}: expected section.key=V1,V2, e.g. --vary dist.cycle_time_ms=1,10")
    return args


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS  # internal: run the measured loop in this process, write the record here


def worker_main(args, dist: Distributed | None = None, system: str = "hvdbert") -> int:
    """One measured process (under horovodrun, or torch.distributed.run for the DDP peer)."""
    recipe = load_recipe(args.recipe, args.set)
    dist = dist or init_distributed(recipe.dist)
    logging.basicConfig(level=logging.WARNING, format=f"[rank {dist.rank}] %(message)s", force=True)
    run = build_measured_run(recipe, args.data, dist, args.compile)
    try:
        record = measure(run, args.warmup_steps, args.steps, system)
        record["compiled"] = args.compile or recipe.train.compile
    finally:
        run.close_stream()
    if dist.rank == 0:
        args.worker.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    dist.shutdown()
    return 0


def terminated(signum, frame) -> None:
    log.warning("hvdbert.bench: terminated (SIGTERM): ending the configuration running")
    raise SystemExit(128 + signum)


def check_variants(args, multi: list[int]) -> None:
    """Every --vary value at every worker count it runs at, before anything runs: a bad one would
    otherwise surface only after the configurations before it, and at 1 worker never (variants run
    at more than 1 worker only)."""
    for vary in args.vary:
        key, values = vary.split("=", 1)
        for value in values.split(","):
            for workers in multi or args.worker_counts:
                try:
                    make_plan(load_recipe(args.recipe, bench_overrides(args.shape, workers, 1,
                                                                       [*args.set, f"{key}={value}"], args.recipe)),
                              workers)
                except UsageError as error:  # named by the flag it came from, not the --set it became
                    raise UsageError(f"--vary {vary}: {str(error).removeprefix(f'--set {key}={value}: ')}") from None
        if not multi:
            raise UsageError(f"--vary {vary}: variants run hvdbert at more than 1 worker, and --workers "
                             f"{args.workers} has none; add one, e.g. --workers 1,2")


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
    multi = [w for w in args.worker_counts if w > 1]
    if args.hosts is not None:
        multi = args.host_counts
    check_variants(args, multi)
    data = open_data(args.data, recipe, SingleProcess())  # prepared once, before any worker starts
    if args.hosts is not None:
        return shaped_main(args, argv, recipe, data.directory)
    if args.find_max_batch:
        result = find_max_batch(recipe, data.directory, init_distributed(recipe.dist))
        print(json.dumps(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        return 0

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
    # SIGTERM (a job's time limit, `kill`) as an exception: the configuration running ends with the
    # benchmark (orchestrate.run_in_own_session) and the temporary directory goes
    signal.signal(signal.SIGTERM, terminated)
    with tempfile.TemporaryDirectory(prefix="hvdbert-bench-") as workdir:
        for _ in range(args.repeats):  # interleaved: a noisy machine affects every configuration alike
            for config in configs:
                config.results.append(run_config(config, args, recipe, data.directory, Path(workdir)))
    rows = summarise(configs)

    top = max((r for r in rows if r["label"] == "hvdbert"), key=lambda r: r["workers"])
    command = "python -m hvdbert.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {
        **{k: top[k] for k in ("workers", "seq_per_s", "tokens_per_s", "mfu", "step_seconds", "cpu_seconds_per_step",
                               "cpu_seconds_per_sequence", "breakdown_seconds", "scaling_efficiency",
                               "peak_memory_bytes", *(f"vs_{peer}" for peer in PEERS),
                               *(f"cpu_vs_{peer}" for peer in PEERS))},
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
    summary["ratio_ranges"] = ratio_ranges(summary["rounds"])
    (output / "bench.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(rows)
    if args.repeats > 1:
        table += "\nRatios within each round of the interleaved repeats:\n\n"
        for number, round_ in enumerate(summary["rounds"], 1):
            table += f"- round {number}: " + ", ".join(f"{k} {v:.2f}" for k, v in round_["ratios"].items()) + "\n"
        table += "- range over the rounds: " + ", ".join(
            f"{k} {low:.2f}-{high:.2f}" for k, (low, high) in summary["ratio_ranges"].items()) + "\n"
    (output / "bench.md").write_text(table, encoding="utf-8")
    shape = args.shape or Path(args.recipe).stem
    plot(rows, output / "bench.png", f"{shape}, micro-batch {recipe.batch.micro_batch_size}, seq "
         f"{recipe.data.max_seq_len}, {recipe.train.precision}, {summary['machine']['device']}")
    print(table, end="")
    print(f"bench: wrote {output}/bench.json, bench.md, bench.png")
    return 0


def shaped_main(args, argv, recipe, data_dir: Path) -> int:
    """--hosts: the shaped-cluster benchmark (bench/cluster.py), its table and plot."""
    from hvdbert.bench.cluster import run_shaped
    from hvdbert.bench.report import shaped_plot, shaped_table

    output = args.output or Path("runs") / f"bench-hosts-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    output.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, terminated)
    started = datetime.datetime.now(datetime.timezone.utc)
    result = run_shaped(args, recipe, data_dir, output)
    command = "python -m hvdbert.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command, "recipe": args.recipe, "shape": args.shape, "model": recipe.model,
               "machine": machine_description(), "started": started.isoformat(timespec="seconds"),
               "minutes": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds() / 60, **result}
    (output / "bench.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (output / "rows.json").unlink(missing_ok=True)  # the rows so far, kept while the benchmark ran
    table = shaped_table(result["rows"], result["baselines"], result["rounds"], result["model_inputs"],
                         result["model_last_fraction"])
    (output / "bench.md").write_text(table, encoding="utf-8")
    shaped_plot(result["rows"], output / "bench.png",
                f"{args.shape or Path(args.recipe).stem}, micro-batch {recipe.batch.micro_batch_size} per host, "
                f"seq {recipe.data.max_seq_len}, one thread per host, tbf-shaped links")
    print(table, end="")
    print(f"bench: wrote {output}/bench.json, bench.md, bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
