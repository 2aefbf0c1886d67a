"""A scaling model: step time, communication time and scaling efficiency of data-parallel training on
a cluster, from the compute per sample, the gradient bytes per step and the allreduce's cost.

    python -m hvdbert.plan --recipe R --workers N --cluster nodes=N,gpus-per-node=G,link=RATE[,...]
                           [--measured-seq-per-s X | --peak-tflops P [--mfu M]] --json

Per optimizer step, each worker computes A micro-batches (A = the plan's accumulation steps) and the
gradients are averaged once. What the model adds up:
- compute: A x micro-batch / (one worker's sequences per second, alone), measured or from a peak
  FLOP/s x an MFU and the family's FLOPs per sequence;
- gradient bytes: what each worker submits per step, hvdbert.compression.compressed_bytes on the
  trainable parameters' shapes (plan builds them on the meta device): none 4 bytes per element, fp16
  and bf16 2, powersgd the rank-r factors of each weight matrix plus the vectors in float32
  (COMPRESSION_BYTES: the per-element figure where no shapes are at hand);
- the allreduce on the topology (nodes x GPUs per node; inter-node rate per node and latency, intra-
  node rate), each transfer at its slowest link:
  ring over all P = nodes x G workers: 2 (P-1)/P x bytes at min(inter, intra) + 2 (P-1) latencies;
  hierarchical: reduce-scatter in the node ((G-1)/G x bytes, intra), a ring across the nodes of each
  worker's 1/G share, all G at once over the node's link (2 (n-1)/n x bytes / inter, 2 (n-1)
  latencies), and the all-gather in the node;
  on the wire, framing adds its headers: Ethernet/IP/TCP at a given MTU carries MTU - 52 payload
  bytes in MTU + 14 frame bytes (what an interface's tx_bytes counts);
- overlap: the allreduce runs during the last micro-batch's backward; `overlap` is the fraction of
  one micro-batch's compute time that hides it (measured by the shaped-cluster benchmark, see
  docs/performance.md). Backward produces the input embeddings' gradients last (and BERT's MLM
  decoder shares the word embeddings, so that gradient is complete only then): their share of the
  bytes (`last_fraction`, from the model's parameters) is sent after backward whatever the overlap.
  exposed = max(last_fraction x comm, comm - overlap x micro). bf16 and powersgd reduce once after
  the last backward: nothing overlaps (exposed = comm), and the compressor's own compute per step
  (the cluster's compressor_seconds, measured or given; rounding, factor products and QR) is added;
- the hosts' own work for the bytes (the cluster's host_cpu_seconds_per_gb: the kernel's network
  stack, copies and the reduction, per GB each worker sends and receives): where the same cores
  compute (CPU workers, the shaped hosts) it is taken from compute and added to the step; on GPU
  clusters the CPU does not compute, and it is 0;
Step time = compute + exposed; scaling efficiency = compute / step time (each worker adds its own
micro-batches: the efficiency against one worker running the same step alone).

Whether compression pays off (`compare_compressions`): the step of every option on the same
cluster, and per option the link rate below which it beats none (`breakeven_link`, found by
bisection on the rate: the gain over none grows as the rate falls).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hvdbert.config import ClusterConfig
from hvdbert.errors import UsageError

# Bytes a gradient element takes in the allreduce, by compression name (dist.compression where the
# recipe has it; dist.fp16_allreduce = true is fp16), where no parameter shapes are at hand. powersgd
# depends on the shapes: its payload is given (hvdbert.compression.compressed_bytes).
COMPRESSION_BYTES = {"none": 4, "fp16": 2, "bf16": 2}
COMPRESSIONS = ("none", "fp16", "bf16", "powersgd")  # what the model counts (dist.compression's choices)
ALLGATHERED = ("bf16",)  # sent by allgather, not allreduce
AFTER_BACKWARD = ("bf16", "powersgd")  # reduced once after the last backward: no overlap, compressor compute

RATE_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12, "bit": 1.0}
TCP_OVERHEAD_BYTES = 52  # IPv4 20 + TCP 20 + timestamps 12: what a segment's payload loses of the MTU
ETHERNET_HEADER_BYTES = 14  # counted by tx_bytes (preamble and FCS are not)


def rate_bits_per_s(rate: str) -> float:
    """tc's rate notation (100mbit, 1gbit, 2.5gbit) in bits per second; a UsageError names a bad one."""
    text = str(rate).strip().lower()
    for unit, factor in RATE_UNITS.items():
        if text.endswith(unit):
            try:
                value = float(text[:-len(unit)])
            except ValueError:
                break
            if 0 < value * factor < float("inf"):
                return value * factor
            break
    raise UsageError(f"link rate {rate!r}: expected a positive number and a unit, e.g. 100mbit, 1gbit, 200gbit")


def compression_of(dist) -> str:
    """The allreduce's compression name for a recipe's [dist] section (DistConfig.wire_compression),
    refused in one line where the model cannot count it."""
    name = dist.wire_compression
    if name not in COMPRESSIONS:
        raise UsageError(f"dist.compression = {name!r}: the scaling model counts {', '.join(COMPRESSIONS)}; "
                         "add the compressor to hvdbert.scaling.COMPRESSIONS")
    return name


def parse_cluster(text: str) -> ClusterConfig:
    """--cluster nodes=N,gpus-per-node=G,link=RATE[,latency-us=L][,intra=RATE][,algorithm=ring|hierarchical]
    [,overlap=F][,mtu=M]: a ClusterConfig, refused in one line when a key or value is wrong."""
    fields = {f.name: f for f in dataclasses.fields(ClusterConfig)}
    values: dict = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        name = key.strip().replace("-", "_")
        if not sep or name not in fields:
            raise UsageError(f"--cluster {text!r}: {part!r} is not KEY=VALUE with KEY one of "
                             f"{', '.join(f.replace('_', '-') for f in fields)}")
        kind = type(fields[name].default)
        try:
            values[name] = kind(value.strip())
        except ValueError:
            raise UsageError(f"--cluster {text!r}: {key.strip()} = {value.strip()!r} is not "
                             f"{'an integer' if kind is int else 'a number' if kind is float else 'valid'}") from None
    if "nodes" not in values or "link" not in values:
        raise UsageError(f"--cluster {text!r}: needs at least nodes=N and link=RATE, e.g. nodes=4,gpus-per-node=8,"
                         "link=200gbit")
    cluster = ClusterConfig(**values)
    for name, spec in fields.items():
        if "valid" in spec.metadata and not spec.metadata["valid"](getattr(cluster, name)):
            raise UsageError(f"--cluster: {name.replace('_', '-')} = {getattr(cluster, name)} {spec.metadata['rule']}")
        if "choices" in spec.metadata and getattr(cluster, name) not in spec.metadata["choices"]:
            raise UsageError(f"--cluster: {name.replace('_', '-')} = {getattr(cluster, name)!r} is not valid; choose "
                             f"one of {', '.join(spec.metadata['choices'])}")
    for name in ("link", "intra"):
        rate_bits_per_s(getattr(cluster, name))
    return cluster


def framing(mtu: int) -> float:
    """Bytes on the wire per payload byte: 1 without framing (mtu 0), else Ethernet/IPv4/TCP's."""
    return 1.0 if mtu == 0 else (mtu + ETHERNET_HEADER_BYTES) / (mtu - TCP_OVERHEAD_BYTES)


@dataclass(frozen=True)
class Allreduce:
    algorithm: str
    seconds: float  # one allreduce of the step's gradients
    wire_bytes_per_worker: float  # what each worker's node link carries, per worker, framing included
    inter_node_bytes_per_node: float  # payload each node sends to other nodes


def allreduce_cost(payload_bytes: float, cluster: ClusterConfig) -> Allreduce:
    """One allreduce of `payload_bytes` on `cluster` (ring or hierarchical, see the module's text)."""
    nodes, g = cluster.nodes, cluster.gpus_per_node
    workers = nodes * g
    inter = rate_bits_per_s(cluster.link) / 8 / framing(cluster.mtu)  # payload bytes per second
    intra = rate_bits_per_s(cluster.intra) / 8
    latency = cluster.latency_us * 1e-6
    algorithm = cluster.algorithm
    if algorithm == "auto":
        algorithm = "hierarchical" if nodes > 1 and g > 1 else "ring"
    if workers == 1:
        return Allreduce(algorithm, 0.0, 0.0, 0.0)
    if algorithm == "ring" or nodes == 1 or g == 1:
        # every ring step moves 1/P of the payload on every link at once; the ring leaves each node
        # once, so with several nodes the slowest hop is a node's link
        share = 2 * (workers - 1) / workers * payload_bytes
        bandwidth = inter if nodes > 1 else intra
        if nodes > 1 and g > 1:
            bandwidth = min(inter, intra)
        seconds = share / bandwidth + 2 * (workers - 1) * latency
        wire = share * framing(cluster.mtu) if nodes > 1 else 0.0
        return Allreduce(algorithm, seconds, wire, share if nodes > 1 else 0.0)
    in_node = (g - 1) / g * payload_bytes / intra  # reduce-scatter (and, the same again, all-gather)
    across = 2 * (nodes - 1) / nodes * payload_bytes  # per node: G workers' shares of 1/G each
    seconds = 2 * in_node + across / inter + 2 * (nodes - 1) * latency + 2 * (g - 1) * latency
    return Allreduce(algorithm, seconds, across * framing(cluster.mtu) / g, across)


def allgather_cost(payload_bytes: float, cluster: ClusterConfig) -> Allreduce:
    """One allgather of every worker's `payload_bytes` (bf16's): a ring over all P workers, each
    sending (P-1) x its payload; with several nodes every ring step crosses a node's link."""
    nodes, g = cluster.nodes, cluster.gpus_per_node
    workers = nodes * g
    if workers == 1:
        return Allreduce("ring", 0.0, 0.0, 0.0)
    inter = rate_bits_per_s(cluster.link) / 8 / framing(cluster.mtu)
    intra = rate_bits_per_s(cluster.intra) / 8
    bandwidth = intra if nodes == 1 else inter if g == 1 else min(inter, intra)
    share = (workers - 1) * payload_bytes
    seconds = share / bandwidth + (workers - 1) * cluster.latency_us * 1e-6
    if nodes == 1:
        return Allreduce("ring", seconds, 0.0, 0.0)
    return Allreduce("ring", seconds, share * framing(cluster.mtu), share)


@dataclass(frozen=True)
class Prediction:
    workers: int
    compute_seconds: float  # per optimizer step, one worker
    communication_seconds: float  # the allreduce, alone
    exposed_communication_seconds: float  # what backward did not hide
    step_seconds: float
    seq_per_s: float  # all workers
    scaling_efficiency: float  # compute / step: against one worker running the same step alone
    gradient_bytes: float  # allreduce payload per step
    wire_bytes_per_worker: float  # on a node's link, per worker and step
    algorithm: str
    overlap: float
    compression: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def predict(cluster: ClusterConfig, trainable_parameters: int, compression: str, micro_batch_size: int,
            accumulation_steps: int, seq_per_s_per_worker: float,
            reference_seq_per_s: float | None = None, payload_bytes: float | None = None,
            last_fraction: float = 0.0) -> Prediction:
    """The step of one worker among nodes x gpus_per_node. seq_per_s_per_worker: its compute rate,
    its optimizer step included unless given apart (the cluster's optimizer_seconds, added once per step); the
    efficiency is against one worker alone at reference_seq_per_s (default: the same rate; lower
    where workers share a machine's cores, as the shaped-cluster benchmark's hosts do).
    payload_bytes: what each worker submits per step (compressed_bytes); default trainable_parameters
    x COMPRESSION_BYTES[compression] (powersgd needs it given). last_fraction: the share of the
    gradient bytes backward produces last (`last_gradient_fraction`), which no overlap hides."""
    if seq_per_s_per_worker <= 0:
        raise UsageError(f"the compute rate {seq_per_s_per_worker:g} sequences/s must be greater than 0")
    workers = cluster.nodes * cluster.gpus_per_node
    micro_seconds = micro_batch_size / seq_per_s_per_worker
    compute = accumulation_steps * micro_seconds + cluster.optimizer_seconds
    alone = (accumulation_steps * micro_batch_size / (reference_seq_per_s or seq_per_s_per_worker)
             + cluster.optimizer_seconds)
    if payload_bytes is None:
        if compression not in COMPRESSION_BYTES:
            raise ValueError(f"{compression}: its payload depends on the parameters' shapes; give payload_bytes")
        payload_bytes = trainable_parameters * COMPRESSION_BYTES[compression]
    payload = payload_bytes
    reduce = (allgather_cost if compression in ALLGATHERED else allreduce_cost)(payload, cluster)
    if compression in AFTER_BACKWARD:  # one reduction after the last backward: nothing hides it
        exposed = reduce.seconds + (cluster.compressor_seconds if workers > 1 else 0.0)
    else:
        exposed = max(last_fraction * reduce.seconds, reduce.seconds - cluster.overlap * micro_seconds)
    # sent and received alike (ring and hierarchical): twice the link's bytes through each host's stack
    exposed += cluster.host_cpu_seconds_per_gb * 2 * reduce.wire_bytes_per_worker / 1e9
    step = compute + exposed
    return Prediction(
        workers=workers, compute_seconds=compute, communication_seconds=reduce.seconds,
        exposed_communication_seconds=exposed, step_seconds=step,
        seq_per_s=workers * accumulation_steps * micro_batch_size / step, scaling_efficiency=alone / step,
        gradient_bytes=payload if workers > 1 else 0.0, wire_bytes_per_worker=reduce.wire_bytes_per_worker,
        algorithm=reduce.algorithm, overlap=0.0 if compression in AFTER_BACKWARD else cluster.overlap,
        compression=compression)


def breakeven_link(step_at, low_bits: float = 1e3, high_bits: float = 1e15) -> float | None:
    """The link rate (bits/s) below which a compression's step beats none's: `step_at(rate)` gives
    (none's step, the compression's step) at a rate. None when it beats none at no rate in
    [low_bits, high_bits]; high_bits when it beats none at every rate up to there. The gain over none
    only grows as the rate falls (less overlap is left to hide none's larger transfer), so the rates
    where it wins form one interval from the bottom, and bisection on the log of the rate finds its top."""
    def wins(bits: float) -> bool:
        none, compressed = step_at(bits)
        return compressed < none

    if not wins(low_bits):
        return None
    if wins(high_bits):
        return high_bits
    low, high = math.log(low_bits), math.log(high_bits)
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if wins(math.exp(middle)) else (low, middle)
    return math.exp(low)


def format_rate(bits: float) -> str:
    """bits/s in tc's notation, 4 significant digits: 1.5e8 -> '150mbit'."""
    for unit in ("tbit", "gbit", "mbit", "kbit"):
        if bits >= RATE_UNITS[unit]:
            return f"{bits / RATE_UNITS[unit]:.4g}{unit}"
    return f"{bits:.4g}bit"


def compare_compressions(cluster: ClusterConfig, payloads: dict[str, float], chosen: str, **step) -> dict:
    """Every compression of `payloads` (name -> bytes each worker submits per step) on `cluster`:
    its predicted step, and whether and below which link rate it beats none. `step`: predict's
    other arguments (trainable_parameters, micro_batch_size, accumulation_steps, seq_per_s_per_worker,
    reference_seq_per_s, last_fraction). `chosen` is the recipe's compression."""
    def at(bits: float, name: str) -> Prediction:
        return predict(dataclasses.replace(cluster, link=f"{bits:.17g}bit"), compression=name,
                       payload_bytes=payloads[name], **step)

    here = {name: predict(cluster, compression=name, payload_bytes=payload, **step)
            for name, payload in payloads.items()}
    table = {}
    for name, prediction in here.items():
        breakeven = None if name == "none" else breakeven_link(
            lambda bits, name=name: (at(bits, "none").step_seconds, at(bits, name).step_seconds))
        table[name] = {"step_seconds": prediction.step_seconds, "scaling_efficiency": prediction.scaling_efficiency,
                       "gradient_bytes": prediction.gradient_bytes,
                       "wire_bytes_per_worker": prediction.wire_bytes_per_worker,
                       "exposed_communication_seconds": prediction.exposed_communication_seconds,
                       "speedup_over_none": here["none"].step_seconds / prediction.step_seconds,
                       "breakeven_link": None if breakeven is None else format_rate(breakeven)}
    return {"compression_table": table,
            "compression_pays_off": chosen != "none" and here[chosen].step_seconds < here["none"].step_seconds,
            "compression_breakeven_link": None if chosen == "none" else table[chosen]["breakeven_link"],
            "compression_fastest": min(here, key=lambda name: here[name].step_seconds)}
