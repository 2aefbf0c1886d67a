"""The shaped-cluster benchmark: hosts made of network namespaces, links of a set rate, hvdbert and
the DDP peer across them, and the scaling model's prediction beside every measurement.

    python -m hvdbert.bench --recipe R --hosts 2,4 --link 1gbit,200mbit,100mbit [--steps S]
                            [--warmup-steps W] [--vary section.key=V1,V2 ...] [--output DIR]

Needs root (hvdbert/netcluster.py makes the hosts: one network namespace, hostname and sshd each,
joined by a switch). Every host runs one worker of one thread (dist.threads_per_worker), started as
users start them: an SSH session into host-a runs horovodrun, which reaches the other hosts over SSH;
the DDP peer (hvdbert's model and step under DistributedDataParallel, Gloo) runs
torch.distributed.run on every host with MASTER_ADDR = host-a. Each worker keeps its micro-batch, so
N hosts train N times the sequences of one (the global batch grows with the hosts).

Per host count and link rate, the references first (the load of a shared machine drifts within
minutes, so each rate gets its own, measured right before it):
- one host alone (the reference of the scaling efficiency);
- every host at once, each alone (no communication): the compute rate one worker gets while N
  share this machine's cores, the scaling model's compute input for N hosts (on a cluster each
  node has its own; here N workers share the cores).
Then, every link shaped at the rate (tc's tbf on both ends): hvdbert, the DDP peer, and the --vary
variants (the DDP peer runs the compression variants too, dist.fp16_allreduce and dist.compression =
fp16 | powersgd, with DDP's fp16 and PowerSGD communication hooks; its bf16 hook needs NCCL).

Reported per configuration: step time, the wait on the allreduce after backward (hvdbert's
gradient_sync), the exposed communication (step time minus the step of the same hosts without
communication), the wire time of the bytes sent (tx_bytes of the hosts' interfaces / link rate),
the packets sent (tx_packets: how many sends carried those bytes), how much of the wire time overlapped
backward (1 - exposed / wire time), the hosts' own CPU for the bytes (CPU time per step above the
same hosts without communication, per worker and GB sent and received),
scaling efficiency against one host, and the scaling model's predicted efficiency and its error.
The model's measured inputs are taken per system after every configuration ran (`calibration`: the
medians of the overlap window and of the host CPU per GB over the system's rows without --vary),
with the input embeddings' share of the gradient from the recipe's model (`last_gradient_fraction`). With --repeats R each rate runs R rounds
(references included, configurations in alternate order); the table gives the median round's row
and, per round, every configuration's speed-up over plain hvdbert and hvdbert's over DDP: the fair
comparison of the --vary knobs on a machine whose load drifts.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import hvdbert
from hvdbert.bench.orchestrate import bench_overrides, median_record
from hvdbert.config import ClusterConfig, Recipe
from hvdbert.errors import UsageError
from hvdbert.netcluster import Cluster, unavailable
from hvdbert.plan import last_gradient_fraction, trainable_named_shapes
from hvdbert.scaling import COMPRESSION_BYTES, compression_of, predict, rate_bits_per_s

log = logging.getLogger("hvdbert.bench")

HOST_NAMES = [f"host-{letter}" for letter in "abcdefgh"]
# The scaling model's framing for these links: none. veth with tbf's 256 KiB bucket passes TCP's
# 64 KiB GSO segments whole, so tx_bytes (and tbf's rate) count one header per 64 KiB (0.1%).
MTU = 0
DDP_PORT = 29517
CONFIG_TIMEOUT_SECONDS = 900


def parse_hosts(text: str) -> list[int]:
    try:
        counts = sorted({int(h) for h in text.split(",")})
    except ValueError:
        raise UsageError(f"--hosts {text!r}: expected host counts like 2 or 2,4") from None
    if not counts or min(counts) < 2 or max(counts) > len(HOST_NAMES):
        raise UsageError(f"--hosts {text!r}: host counts must be from 2 to {len(HOST_NAMES)}")
    return counts


def parse_links(text: str) -> list[str]:
    links = [link.strip() for link in text.split(",") if link.strip()]
    if not links:
        raise UsageError("--link: expected link rates like 1gbit,100mbit")
    for link in links:
        rate_bits_per_s(link)
    return links


class ShapedBench:
    """The hosts, and one configuration at a time on them."""

    def __init__(self, workdir: Path, hosts: int, args, recipe: Recipe, data_dir: Path):
        self.workdir, self.args, self.recipe, self.data_dir = workdir, args, recipe, data_dir
        self.cluster = Cluster(workdir, HOST_NAMES[:hosts])
        repo = Path(hvdbert.__file__).resolve().parents[1]
        self.python = workdir / "python"  # every worker's interpreter: this hvdbert, one thread
        threads = recipe.dist.threads_per_worker
        self.python.write_text(
            "#!/bin/sh\n"
            f"export PYTHONPATH={shlex.quote(str(repo))} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false\n"
            f"export OMP_NUM_THREADS={threads} MKL_NUM_THREADS={threads}\n"
            f'exec {shlex.quote(sys.executable)} "$@"\n')
        self.python.chmod(0o755)
        self.bin = Path(sys.executable).parent
        self.count = 0

    def close(self) -> None:
        self.cluster.close()

    def worker_args(self, hosts: int, sets: list[str], result: Path) -> list[str]:
        args = self.args
        overrides = bench_overrides(args.shape, hosts, args.warmup_steps + args.steps, [*args.set, *sets],
                                    args.recipe)
        return ["--recipe", str(Path(args.recipe).resolve()), "--data", str(self.data_dir), "--steps",
                str(args.steps), "--warmup-steps", str(args.warmup_steps), "--worker", str(result),
                *(a for s in overrides for a in ("--set", s))]

    def on_host(self, name: str, words: list[str]) -> list[str]:
        path = f"{self.bin}:/usr/sbin:/usr/bin:/sbin:/bin"
        return self.cluster.ssh_command(name, f"cd {shlex.quote(os.getcwd())} && PATH={shlex.quote(path)} "
                                              + " ".join(shlex.quote(w) for w in words))

    def run(self, system: str, hosts: int, sets: list[str] = (), alone: bool = False) -> dict | list[dict]:
        """`attempt`, once more after a failure: the machine's /etc/netns (the hosts' names and SSH
        settings) is shared with other clusters made on it, and one removing it at its end (as this
        module did once) breaks the next SSH session into a host; the files are written again first,
        and an sshd that ended is started again."""
        try:
            return self.attempt(system, hosts, sets, alone)
        except RuntimeError as error:
            log.warning("bench: %s; trying once more", " ".join(str(error).split())[:300])
            restarted = self.cluster.ensure_sshd()
            if restarted:
                log.warning("bench: sshd had ended on %s: started again", ", ".join(restarted))
            return self.attempt(system, hosts, sets, alone)

    def attempt(self, system: str, hosts: int, sets: list[str] = (), alone: bool = False) -> dict | list[dict]:
        """One configuration: `system` (hvdbert | ddp-hvdbert-model) on the first `hosts` hosts; with
        `alone`, every host runs one worker by itself at the same time (no communication)."""
        names = self.cluster.names[:hosts]
        for name in self.cluster.names:
            self.cluster.write_etc(name)
        self.count += 1
        results = [self.workdir / f"result-{self.count}-{k}.json" for k in range(hosts)]
        if alone:
            commands = [self.on_host(name, [str(self.python), "-m", "hvdbert.bench",
                                            *self.worker_args(1, list(sets), results[k])])
                        for k, name in enumerate(names)]
        elif system == "hvdbert":
            commands = [self.on_host(names[0], [
                str(self.bin / "horovodrun"), "--gloo", "-np", str(hosts), "-H", ",".join(f"{n}:1" for n in names),
                str(self.python), "-m", "hvdbert.bench", *self.worker_args(hosts, list(sets), results[0])])]
        else:
            master = self.cluster.address[names[0]]["eth0"]
            commands = [self.on_host(name, [
                "env", "GLOO_SOCKET_IFNAME=eth0", str(self.python), "-m", "torch.distributed.run",
                "--nnodes", str(hosts), "--node-rank", str(k), "--nproc-per-node", "1", "--master-addr", master,
                "--master-port", str(DDP_PORT), "-m", "hvdbert.bench.peers.ddp_model",
                *self.worker_args(hosts, list(sets), results[0])]) for k, name in enumerate(names)]
        logs = [self.workdir / f"log-{self.count}-{k}.txt" for k in range(len(commands))]
        started = time.perf_counter()
        load_before = os.getloadavg()[0]
        processes = []
        try:
            for command, path in zip(commands, logs):
                with open(path, "w") as out:
                    processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + CONFIG_TIMEOUT_SECONDS
            for process in processes:
                process.wait(timeout=max(1, deadline - time.monotonic()))
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            for name in names:
                self.cluster.kill_processes(name)  # whatever a failed configuration left behind
        wanted = results if alone else results[:1]
        if any(p.returncode != 0 for p in processes) or not all(r.is_file() for r in wanted):
            tail = "\n".join(path.read_text()[-2000:] for path in logs)
            raise RuntimeError(f"bench: {system} on {hosts} hosts {' '.join(sets)} failed:\n{tail}")
        records = [json.loads(r.read_text()) for r in wanted]
        for record in records:
            record.update(wall_seconds=time.perf_counter() - started,
                          load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])
        return records if alone else records[0]


def compression_variant(sets: list[str]) -> bool:
    """A --vary variant the DDP peer runs too, with its communication hook: fp16 and powersgd (DDP's
    bf16 hook needs NCCL; the hosts run Gloo)."""
    flat = [s.replace(" ", "").lower() for s in sets]
    return any(s in ("dist.fp16_allreduce=true", "dist.compression=fp16", "dist.compression=powersgd") for s in flat)


def measured_row(row: dict, reference: dict, rate: str) -> dict:
    """What one configuration measured against the references of its round: efficiency, the exposed
    communication, the wire time, and the hosts' own CPU for the bytes (the CPU time per step above
    the same hosts computing without communicating, per worker, per GB sent and received)."""
    hosts = row["workers"]
    wire = row["wire_tx_bytes_per_rank_per_step"]
    wire_seconds = wire / (rate_bits_per_s(rate) / 8)
    exposed = max(0.0, row["step_seconds"] - reference["concurrent_step_seconds"])
    host_cpu = max(0.0, row["cpu_seconds_per_step"] - reference["concurrent_cpu_seconds_per_step"]) / hosts
    micro_seconds = row["micro_batch_size"] / reference["concurrent_seq_per_s"]
    return {
        "link": rate,
        "hosts": hosts,
        "reference": reference,
        "scaling_efficiency": row["seq_per_s"] / (hosts * reference["alone_seq_per_s"]),
        "gradient_wait_seconds": row["breakdown_seconds"]["gradient_sync"],
        "exposed_communication_seconds": exposed,
        "wire_seconds": wire_seconds,
        "overlapped_fraction": min(1.0, max(0.0, 1 - exposed / wire_seconds)) if wire_seconds > 0 else None,
        "host_cpu_seconds_per_step": host_cpu,
        "host_cpu_seconds_per_gb": host_cpu / (2 * wire / 1e9) if wire > 0 else None,
        # the model's `overlap` as measured here: what of the wire time and the hosts' CPU for it
        # did not show, over one micro-batch's compute
        "overlap_window": (wire_seconds + host_cpu - exposed) / micro_seconds,
        "wire_bytes_per_host_per_step": wire,
        "wire_packets_per_host_per_step": row.get("wire_tx_packets_per_rank_per_step"),  # absent in older records
    }


def calibration(rows: list[dict], overlap: float | None) -> dict[str, dict]:
    """Per system (hvdbert, the DDP peer): the scaling model's measured inputs, the medians over its
    rows without --vary settings of the hosts' CPU per GB and of the overlap window (clipped to
    [0, 1]; --overlap, when given, instead). One pair per system for every rate and host count, so
    the model's error at each point says how well that pair describes them all."""
    inputs = {}
    for system in dict.fromkeys(r["system"] for r in rows):
        plain = [r for r in rows if r["label"] == system] or [r for r in rows if r["system"] == system]
        cpu = [r["host_cpu_seconds_per_gb"] for r in plain if r["host_cpu_seconds_per_gb"] is not None]
        window = statistics.median(r["overlap_window"] for r in plain)
        inputs[system] = {"host_cpu_seconds_per_gb": statistics.median(cpu) if cpu else 0.0,
                          "overlap": min(1.0, max(0.0, window)) if overlap is None else overlap}
    return inputs


def model_row(row: dict, inputs: dict, last_fraction: float) -> dict:
    """The scaling model's prediction for one measured configuration, from its round's references
    and its system's measured inputs (`calibration`)."""
    reference = row["reference"]
    cluster = ClusterConfig(nodes=row["hosts"], gpus_per_node=1, link=row["link"], latency_us=50.0,
                            overlap=inputs["overlap"], mtu=MTU,
                            host_cpu_seconds_per_gb=inputs["host_cpu_seconds_per_gb"])
    predicted = predict(cluster, row["trainable_parameters"], row["compression"], row["micro_batch_size"], 1,
                        reference["concurrent_seq_per_s"], reference_seq_per_s=reference["alone_seq_per_s"],
                        payload_bytes=row["allreduce_payload_bytes_per_step"], last_fraction=last_fraction)
    return {
        "predicted_wire_bytes_per_host_per_step": predicted.wire_bytes_per_worker,
        "predicted_step_seconds": predicted.step_seconds,
        "predicted_scaling_efficiency": predicted.scaling_efficiency,
        "model_error_points": 100 * (predicted.scaling_efficiency - row["scaling_efficiency"]),
        "model_overlap": inputs["overlap"],
        "model_host_cpu_seconds_per_gb": inputs["host_cpu_seconds_per_gb"],
        "model_last_fraction": last_fraction,
    }


def run_shaped(args, recipe: Recipe, data_dir: Path, output: Path) -> dict:
    """Every host count, every link rate: the rows of the shaped-cluster benchmark. With --repeats R,
    every rate runs R rounds, each with its own references, the configurations in alternate order
    (ABBA); a row is the median round's (by seq/s), and `rounds` keeps every round's step time with
    its ratios to plain hvdbert and to DDP in that round."""
    reason = unavailable()
    if reason:
        raise UsageError(f"--hosts: {reason}")
    compression_of(recipe.dist)  # a compression the model cannot count is refused before anything runs
    variants = [[f"{vary.split('=', 1)[0]}={value}"] for vary in args.vary for value in vary.split("=", 1)[1].split(",")]
    configs = [("hvdbert", []), ("ddp-hvdbert-model", [])]
    configs += [("hvdbert", sets) for sets in variants]
    configs += [("ddp-hvdbert-model", sets) for sets in variants if compression_variant(sets)]
    last_fraction = last_gradient_fraction(trainable_named_shapes(recipe))
    rows, baselines, rounds = [], [], []
    with tempfile.TemporaryDirectory(prefix="hvdbert-hosts-") as workdir:
        for hosts in args.host_counts:
            (Path(workdir) / f"hosts-{hosts}").mkdir()
            bench = ShapedBench(Path(workdir) / f"hosts-{hosts}", hosts, args, recipe, data_dir)
            try:
                for rate in args.links:
                    measured: dict[str, list[dict]] = {}
                    for number in range(args.repeats):
                        order = configs if number % 2 == 0 else configs[::-1]
                        records = measure_round(bench, hosts, rate, order, baselines)
                        rounds.append(round_ratios(hosts, rate, number + 1, records))
                        for record in records:
                            measured.setdefault(record["label"], []).append(record)
                        (output / "rows.json").write_text(json.dumps(rows + [r for rs in measured.values() for r in rs],
                                                                     indent=2) + "\n", encoding="utf-8")
                    rows += [median_record(found) for found in measured.values()]
            finally:
                bench.close()
    inputs = calibration(rows, args.overlap)
    for row in rows:
        row.update(model_row(row, inputs[row["system"]], last_fraction))
    return {"rows": rows, "baselines": baselines, "rounds": rounds, "repeats": args.repeats,
            "model_inputs": inputs, "model_last_fraction": last_fraction, "compression_bytes": COMPRESSION_BYTES}


def measure_round(bench: ShapedBench, hosts: int, rate: str, configs: list[tuple[str, list[str]]],
                  baselines: list[dict]) -> list[dict]:
    """One round at one rate: the references first, right before the configurations they are the
    reference of (on a shared machine the load drifts within minutes), then every configuration on
    links shaped at `rate`."""
    log.info("bench: %d hosts, %s: one host alone, then all %d at once without communication", hosts, rate, hosts)
    alone = bench.run("hvdbert", 1, alone=True)[0]
    concurrent = bench.run("hvdbert", hosts, alone=True)
    reference = {"alone_seq_per_s": alone["seq_per_s"], "alone_step_seconds": alone["step_seconds"],
                 "concurrent_seq_per_s": statistics.mean(r["seq_per_s"] for r in concurrent),
                 "concurrent_step_seconds": statistics.mean(r["step_seconds"] for r in concurrent),
                 "concurrent_cpu_seconds_per_step": sum(r["cpu_seconds_per_step"] for r in concurrent)}
    baselines.append({"hosts": hosts, "link": rate, **reference,
                      "load_average": alone["load_average"] + concurrent[0]["load_average"]})
    log.info("bench: 1 host %.2f seq/s; %d at once %.2f seq/s each", alone["seq_per_s"], hosts,
             reference["concurrent_seq_per_s"])
    bench.cluster.shape(rate)
    records = []
    for system, sets in configs:
        label = " ".join([system, *sets])
        log.info("bench: %s, %d hosts, %s ...", label, hosts, rate)
        record = bench.run(system, hosts, sets)
        record.update(label=label, hosts=hosts)
        record.update(measured_row(record, reference, rate))
        log.info("bench: %s, %d hosts, %s: step %.2f s, efficiency %.2f, exposed %.2f s of %.2f s on the wire",
                 label, hosts, rate, record["step_seconds"], record["scaling_efficiency"],
                 record["exposed_communication_seconds"], record["wire_seconds"])
        records.append(record)
    bench.cluster.shape(None)
    return records


def round_ratios(hosts: int, rate: str, number: int, records: list[dict]) -> dict:
    """One round's step times, each configuration's against plain hvdbert's and hvdbert's against the
    DDP peer's with the same compression: within a round the load is alike, so these compare fairly."""
    step = {r["label"]: r["step_seconds"] for r in records}
    versus_ddp = {}
    for r in records:
        peer = next((p for p in records if p["system"] == "ddp-hvdbert-model"
                     and p.get("compression") == r.get("compression")), None)
        if r["system"] == "hvdbert" and peer:
            versus_ddp[r["label"]] = peer["step_seconds"] / r["step_seconds"]
    return {"hosts": hosts, "link": rate, "round": number, "step_seconds": step,
            "speedup_vs_hvdbert": {label: step["hvdbert"] / value for label, value in step.items()},
            "hvdbert_vs_ddp": versus_ddp}
