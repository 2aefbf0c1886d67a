"""Resolve a recipe's batch size, accumulation, learning rate and schedule for a worker count.

    python -m hvdbert.plan --recipe recipes/bert-large-phase1.toml --workers 8 [--json] [--set KEY=VALUE]
    python -m hvdbert.plan --recipe R --workers 16 --cluster nodes=2,gpus-per-node=8,link=200gbit \
                           [--measured-seq-per-s X] [--json]   (the scaling model, hvdbert/scaling.py)
    python -m hvdbert.plan --workers 8 -- PRETRAIN ARGS   (the launchers' pre-flight: also refuses what
                                                           `hvdbert.pretrain PRETRAIN ARGS` would)

Two batch rules (batch.scaling):
- fixed-global: the global batch stays as written; each worker accumulates
  global / (workers x micro) micro-batches per optimizer step (NVIDIA's practice for BERT). The worker
  count alone changes nothing else: the same global batch gets the same rate and schedule.
- per-worker: each worker keeps the reference accumulation, so the global batch grows by
  k = workers / reference_workers, and max_steps shrink by k so the run sees the same number of samples.

The learning rate follows the global batch. optim.lr belongs to optim.reference_global_batch_size
(the batch the recipe files state, unless they name another); when the plan's global batch B differs
from that reference R (a `--set batch.global_batch_size=...`, or per-worker growth), optim.lr_scaling
derives the rate:
- sqrt: lr x sqrt(B / R) (You et al. 2019, LAMB). Their BERT runs keep the warmup at the same number
  of steps for every batch ("linear-epoch" warmup: 3125 steps from batch 512 to 32K), so per-worker
  growth keeps warmup_steps while max_steps shrink.
- linear: lr x B / R (Goyal et al. 2017). They warm up over the same number of samples (5 epochs) at
  every batch, so per-worker growth shrinks warmup_steps by k together with max_steps.
- none: lr as written, with one warning line; the warmup shrinks as for linear.
- auto (the default): the optimizer's own rule (hvdbert/optimizers.py): sqrt for LAMB, linear for
  AdamW and StableAdamW.
With fixed-global, a `--set` of the global batch changes the rate only: train.max_steps and the warmup
(warmup_proportion of it) describe the run asked for, and stay as written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from hvdbert.config import MAX_GLOBAL_BATCH_SIZE, MAX_WORKERS, OptimConfig, Recipe, load_recipe, recipe_warnings
from hvdbert.errors import ArgumentParser, UsageError, cli_entry
from hvdbert.optimizers import OPTIMIZERS


@dataclass(frozen=True)
class Plan:
    workers: int
    global_batch_size: int  # sequences per optimizer step, all workers together
    micro_batch_size: int  # sequences per worker per forward/backward pass
    accumulation_steps: int  # micro-batches per worker per optimizer step
    lr: float  # peak learning rate, derived for global_batch_size by lr_scaling
    lr_scaling: str  # the rule that derived lr: sqrt | linear | none (auto resolved by optimizer)
    reference_lr: float  # optim.lr: the rate at reference_global_batch_size
    reference_global_batch_size: int
    warmup_steps: int
    max_steps: int
    max_seq_len: int
    max_predictions_per_seq: int
    scaling: str
    reference_workers: int
    decay_power: float
    end_lr: float
    # optim.schedule and its wsd tail; a Plan built without them (as before wsd existed) is polynomial
    schedule: str = "polynomial"
    decay_steps: int = 0  # wsd: the decaying tail of max_steps
    decay_shape: str = "linear"  # wsd: optim.decay_shape

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.max_seq_len

    @property
    def lr_derivation(self) -> str:
        """How lr came from the reference rate, e.g. `0.006 x sqrt(4096 / 65536)`."""
        if self.global_batch_size == self.reference_global_batch_size:
            return f"{self.lr:g}, the rate at its reference global batch ({self.lr_scaling} rule unused)"
        ratio = f"{self.global_batch_size} / {self.reference_global_batch_size}"
        factor = {"sqrt": f" x sqrt({ratio})", "linear": f" x {ratio}", "none": ""}[self.lr_scaling]
        return f"{self.reference_lr:g}{factor} = {self.lr:g} ({self.lr_scaling})"

    @property
    def lr_warning(self) -> str:
        """One line when the rate kept belongs to another global batch (lr_scaling = none), else ''."""
        if self.lr_scaling != "none" or self.global_batch_size == self.reference_global_batch_size:
            return ""
        return (f"hvdbert: warning: optim.lr = {self.reference_lr:g} belongs to a global batch of "
                f"{self.reference_global_batch_size}, this plan's is {self.global_batch_size}; "
                "optim.lr_scaling = none keeps it (sqrt or linear would derive one)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_warnings(recipe: Recipe, plan: Plan) -> list[str]:
    """Every warning line a run of `recipe` on `plan` gets: printed by plan and by pretrain (rank 0)."""
    return [warning for warning in (plan.lr_warning, *recipe_warnings(recipe)) if warning]


def _workable_counts(micro_batches: int, workers: int) -> str:
    """The worker counts nearest to `workers` that divide the micro-batches of one global step."""
    # Divisors come in pairs (d, n / d) with d <= sqrt(n): isqrt(n) trials, not n (a 2**24 batch of
    # micro-batches of 1 takes 4096).
    pairs = [(d, micro_batches // d) for d in range(1, math.isqrt(micro_batches) + 1) if micro_batches % d == 0]
    divisors = sorted({d for pair in pairs for d in pair if d <= MAX_WORKERS})
    below = [d for d in divisors if d < workers]
    above = [d for d in divisors if d > workers]
    near = ([below[-1]] if below else []) + ([above[0]] if above else [])
    return " or ".join(str(d) for d in near)


LR_RULES = {
    "sqrt": math.sqrt,  # You et al. 2019
    "linear": lambda factor: factor,  # Goyal et al. 2017
    "none": lambda factor: 1.0,
}


def lr_rule(optim: OptimConfig) -> str:
    """optim.lr_scaling with auto resolved by the optimizer's entry: sqrt for LAMB (You et al. 2019),
    linear for AdamW (Goyal et al. 2017)."""
    if optim.lr_scaling != "auto":
        return optim.lr_scaling
    return OPTIMIZERS[optim.name].lr_scaling


def make_plan(recipe: Recipe, workers: int) -> Plan:
    batch = recipe.batch
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"worker count {workers} must be from 1 to {MAX_WORKERS}")
    if batch.global_batch_size % batch.micro_batch_size:
        raise UsageError(
            f"{recipe.source}: batch.global_batch_size = {batch.global_batch_size} is not a multiple of "
            f"batch.micro_batch_size = {batch.micro_batch_size}"
        )
    micro_batches = batch.global_batch_size // batch.micro_batch_size  # per step, all workers

    if batch.scaling == "fixed-global":
        if micro_batches % workers:
            raise UsageError(
                f"{workers} workers cannot split batch.global_batch_size = {batch.global_batch_size} into "
                f"micro-batches of {batch.micro_batch_size} ({micro_batches} per step is not divisible by "
                f"{workers}); worker counts that work nearby: {_workable_counts(micro_batches, workers)}"
            )
        return _plan(recipe, workers, batch.global_batch_size, micro_batches // workers, steps_factor=Fraction(1))

    # per-worker: the reference accumulation stays, the global batch grows with the workers
    if micro_batches % batch.reference_workers:
        raise UsageError(
            f"{recipe.source}: batch.global_batch_size = {batch.global_batch_size} is not divisible by "
            f"batch.reference_workers x batch.micro_batch_size = "
            f"{batch.reference_workers} x {batch.micro_batch_size}"
        )
    accumulation = micro_batches // batch.reference_workers
    global_batch = accumulation * batch.micro_batch_size * workers
    if global_batch > MAX_GLOBAL_BATCH_SIZE:
        raise UsageError(
            f"{workers} workers grow batch.global_batch_size = {batch.global_batch_size} (batch.scaling = "
            f"per-worker, batch.reference_workers = {batch.reference_workers}) to {global_batch} sequences per "
            f"step, beyond the largest, {MAX_GLOBAL_BATCH_SIZE}; use fewer workers or batch.scaling = fixed-global"
        )
    return _plan(recipe, workers, global_batch, accumulation,
                 steps_factor=Fraction(workers, batch.reference_workers))


def _plan(recipe: Recipe, workers: int, global_batch: int, accumulation: int, steps_factor: Fraction) -> Plan:
    """The plan for `global_batch`; steps_factor: how many times fewer steps see the recipe's samples
    (a fraction: step counts divided by it stay exact integers, where a float quotient rounds)."""
    optim, train = recipe.optim, recipe.train
    rule = lr_rule(optim)
    reference_batch = optim.reference_global_batch_size or recipe.batch.global_batch_size
    max_steps = max(1, math.ceil(train.max_steps / steps_factor))
    warmup_steps = round(optim.warmup_proportion * train.max_steps)
    # LAMB's warmup keeps its steps (You et al. 2019); Goyal et al. keep its samples
    warmup_steps = min(warmup_steps, max_steps) if rule == "sqrt" else math.ceil(warmup_steps / steps_factor)
    # warmup-stable-decay: the decay tail keeps its share of the samples, within what warmup leaves
    decay_steps = max(0, min(max_steps - warmup_steps,
                             math.ceil(round(optim.decay_proportion * train.max_steps) / steps_factor)))
    return Plan(
        workers=workers,
        global_batch_size=global_batch,
        micro_batch_size=recipe.batch.micro_batch_size,
        accumulation_steps=accumulation,
        lr=optim.lr * LR_RULES[rule](global_batch / reference_batch),
        lr_scaling=rule,
        reference_lr=optim.lr,
        reference_global_batch_size=reference_batch,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        max_seq_len=recipe.data.max_seq_len,
        max_predictions_per_seq=recipe.data.max_predictions_per_seq,
        scaling=recipe.batch.scaling,
        reference_workers=recipe.batch.reference_workers,
        decay_power=optim.decay_power,
        end_lr=optim.end_lr,
        schedule=optim.schedule,
        decay_steps=decay_steps if optim.schedule == "wsd" else 0,
        decay_shape=optim.decay_shape,
    )


def trainable_named_shapes(recipe: Recipe) -> list[tuple[str, object]]:
    """The names and shapes of the parameters Horovod reduces: the family's model as hvdbert trains it
    (the heads the data format leaves without gradients frozen), built on the meta device (no memory,
    no weights)."""
    import torch

    from hvdbert import families

    with torch.device("meta"):
        model = families.model_class(recipe.model)(families.build_config(recipe.model))
    families.family_of(recipe.model).hooks.prepare_for_training(model, recipe.data.format == "nsp")
    return [(name, p.shape) for name, p in model.named_parameters() if p.requires_grad]


def trainable_shapes(recipe: Recipe) -> list:
    """The shapes of the parameters Horovod reduces (`trainable_named_shapes`)."""
    return [shape for _, shape in trainable_named_shapes(recipe)]


def last_gradient_fraction(named: list[tuple[str, object]]) -> float:
    """The share of the reduced elements whose gradients backward completes last: the input embeddings
    (BERT's `embeddings.*`, ModernBERT's `embeddings.tok_embeddings` and norm), the first layer run
    and so the last one reached; BERT's MLM decoder is the word-embedding matrix itself, so that
    gradient too is complete only then. No overlap with backward can hide their allreduce. `named`:
    `trainable_named_shapes`."""
    total = sum(shape.numel() for _, shape in named)
    last = sum(shape.numel() for name, shape in named if ".embeddings." in f".{name}")
    return last / total


def trainable_parameters(recipe: Recipe) -> int:
    """How many parameters Horovod reduces (`trainable_shapes`)."""
    return sum(shape.numel() for shape in trainable_shapes(recipe))


def predict_cluster(recipe: Recipe, plan: Plan, cluster, measured_seq_per_s: float | None) -> dict:
    """The scaling model's prediction (hvdbert/scaling.py) for this plan on `cluster`, and the same step
    under every compression (`compare_compressions`: does the recipe's pay off, below which rate)."""
    from hvdbert import families
    from hvdbert.compression import compressed_bytes
    from hvdbert.scaling import COMPRESSIONS, compare_compressions, compression_of, predict

    workers = cluster.nodes * cluster.gpus_per_node
    if workers != plan.workers:
        raise UsageError(f"--cluster has nodes x gpus-per-node = {cluster.nodes} x {cluster.gpus_per_node} = "
                         f"{workers} workers, --workers {plan.workers}; make them agree")
    if measured_seq_per_s is None:
        flops = families.family_of(recipe.model).hooks.training_flops_per_sequence(
            recipe.model, plan.max_seq_len, plan.max_predictions_per_seq)
        measured_seq_per_s = cluster.peak_tflops * 1e12 * cluster.mfu / flops
    named = trainable_named_shapes(recipe)
    shapes = [shape for _, shape in named]
    chosen = compression_of(recipe.dist)
    payloads = {name: compressed_bytes(shapes, name, recipe.dist.powersgd_rank) for name in COMPRESSIONS}
    step = dict(trainable_parameters=sum(s.numel() for s in shapes), micro_batch_size=plan.micro_batch_size,
                accumulation_steps=plan.accumulation_steps, seq_per_s_per_worker=measured_seq_per_s,
                last_fraction=last_gradient_fraction(named))
    prediction = predict(cluster, compression=chosen, payload_bytes=payloads[chosen], **step).to_dict()
    return {**prediction, **compare_compressions(cluster, payloads, chosen, **step)}


def format_plan(plan: Plan) -> str:
    rows = plan.to_dict()
    rows["tokens_per_step"] = plan.tokens_per_step
    rows["lr_derivation"] = plan.lr_derivation
    width = max(len(k) for k in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows.items())


@cli_entry("hvdbert.plan")
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # `-- PRETRAIN ARGS`: the launchers' pre-flight hands over the training's command line as the
    # workers will get it, read below by pretrain's own parser.
    run_argv = argv[argv.index("--") + 1:] if "--" in argv else None
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = ArgumentParser(prog="python -m hvdbert.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", help="recipe TOML file (required unless given after --)")
    parser.add_argument("--workers", type=int, required=True, help="number of Horovod workers")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe key (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--cluster", metavar="nodes=N,gpus-per-node=G,link=RATE[,...]",
                        help="also predict step time, communication and scaling efficiency on this cluster "
                             "(keys: nodes, gpus-per-node, link, latency-us, intra, algorithm, overlap, "
                             "peak-tflops, mfu, mtu, compressor-seconds, host-cpu-seconds-per-gb, optimizer-seconds; docs/performance.md, docs/compression.md)")
    parser.add_argument("--measured-seq-per-s", type=float, metavar="X",
                        help="with --cluster: one worker's measured sequences/s alone (else peak-tflops x mfu)")
    # The launchers' pre-flight: what `hvdbert.pretrain` with these arguments would refuse, found
    # before horovodrun starts any worker.
    parser.add_argument("--output", type=Path, help="also check pretrain's run directory (writable, not in "
                                                    "use, not a finished run unless --resume)")
    parser.add_argument("--data", type=Path, help="also check pretrain's prepared data against the recipe")
    parser.add_argument("--resume", metavar="auto|CHECKPOINT_DIR", help="as pretrain's --resume")
    parser.add_argument("--eval-data", type=Path, metavar="DIR", help="as pretrain's --eval-data")
    args = parser.parse_args(argv)
    if run_argv is not None:
        given = [flag for flag in ("recipe", "output", "data", "resume", "eval_data", "set") if getattr(args, flag)]
        if given:
            raise UsageError(f"--{given[0].replace('_', '-')} given before `--`: after `--` comes pretrain's whole "
                             "command line (--recipe, --set, --data, --output, --resume, --eval-data), once")
        from hvdbert.preflight import pretrain_parser

        run = pretrain_parser().parse_args(run_argv)  # what a worker would refuse, refused here
        args.recipe, args.set, args.output, args.data = run.recipe, run.set, run.output, run.data
        args.resume, args.eval_data = run.resume, run.eval_data
    elif args.recipe is None:
        parser.error("the following arguments are required: --recipe")
    cluster = None
    if args.cluster is not None:
        from hvdbert.scaling import parse_cluster

        cluster = parse_cluster(args.cluster)
    elif args.measured_seq_per_s is not None:
        raise UsageError("--measured-seq-per-s is an input of the scaling model: give --cluster as well")
    recipe = load_recipe(args.recipe, args.set)
    plan = make_plan(recipe, args.workers)
    for warning in run_warnings(recipe, plan):
        print(warning, file=sys.stderr)
    if args.output is not None:
        from hvdbert.preflight import preflight  # torch and the checkpoint reader: only when asked

        preflight(recipe, args.output, args.data, args.resume, args.eval_data)
    result = plan.to_dict()
    if cluster is not None:
        prediction = predict_cluster(recipe, plan, cluster, args.measured_seq_per_s)
        result.update(prediction, cluster=dataclasses.asdict(cluster))
    if args.json:
        print(json.dumps(result))
    else:
        print(format_plan(plan))
        if cluster is not None:
            table = prediction.pop("compression_table")
            width = max(len(k) for k in prediction)
            print("\n".join(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}"
                            for key, value in prediction.items()))
            print(f"{'compression':<11}  {'step s':>9}  {'efficiency':>10}  {'vs none':>7}  beats none below")
            for name, row in table.items():
                print(f"{name:<11}  {row['step_seconds']:>9.4g}  {row['scaling_efficiency']:>10.3f}  "
                      f"{row['speedup_over_none']:>6.2f}x  {row['breakeven_link'] or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
