"""The scaling model (hvdbert/scaling.py, `python -m hvdbert.plan --cluster`) against hand-computed
cases, its refusals, and Horovod's knobs as recipe keys (dist.py sets them before hvd.init).

The model's bytes against bytes counted on a shaped link: tests/test_multihost.py."""
from __future__ import annotations

import dataclasses
import json

import pytest

from conftest import TINY
from hvdbert.config import ClusterConfig, DistConfig, load_recipe
from hvdbert.errors import UsageError
from hvdbert.scaling import (allgather_cost, allreduce_cost, breakeven_link, compare_compressions, compression_of,
                             framing, parse_cluster, predict, rate_bits_per_s)


def test_rates_and_framing_by_hand():
    assert rate_bits_per_s("100mbit") == 100e6 and rate_bits_per_s("2.5Gbit") == 2.5e9
    assert rate_bits_per_s("1600gbit") == 1.6e12 and rate_bits_per_s("800kbit") == 800e3
    # Ethernet at MTU 1500: 1448 payload bytes of TCP (timestamps on) in a frame of 1514
    assert framing(1500) == pytest.approx(1514 / 1448) and framing(0) == 1.0
    for bad in ("fast", "100", "-1gbit", "0mbit", "1e400gbit"):
        with pytest.raises(UsageError, match=f"link rate '{bad}': expected a positive number and a unit"):
            rate_bits_per_s(bad)


def test_ring_between_two_hosts_by_hand():
    # 10 MB between 2 hosts at 100 Mbit/s (12.5 MB/s): each sends 2 x 1/2 x 10 MB = 10 MB, 0.8 s,
    # plus 2 x (2 - 1) latencies of 50 us
    cluster = ClusterConfig(nodes=2, link="100mbit", latency_us=50.0, overlap=0.25)
    cost = allreduce_cost(10e6, cluster)
    assert cost.algorithm == "ring" and cost.seconds == pytest.approx(0.8 + 2 * 50e-6)
    assert cost.wire_bytes_per_worker == pytest.approx(10e6)
    # 2.5M parameters in fp32 (10 MB); micro-batch 32 at 16 seq/s: 2 s of compute; backward hides
    # 0.25 x 2 s = 0.5 s of the 0.8001 s, so 0.3001 s is exposed
    p = predict(cluster, 2_500_000, "none", 32, 1, 16.0)
    assert p.compute_seconds == pytest.approx(2.0) and p.exposed_communication_seconds == pytest.approx(0.3001)
    assert p.step_seconds == pytest.approx(2.3001) and p.scaling_efficiency == pytest.approx(2.0 / 2.3001)
    assert p.seq_per_s == pytest.approx(64 / 2.3001) and p.gradient_bytes == 10e6
    # fp16: half the bytes, 0.4001 s, all hidden in the 0.5 s
    half = predict(cluster, 2_500_000, "fp16", 32, 1, 16.0)
    assert half.communication_seconds == pytest.approx(0.4001) and half.step_seconds == pytest.approx(2.0)
    # 4 accumulation steps: compute 8 s, and still one allreduce, after the last micro-batch
    assert predict(cluster, 2_500_000, "none", 32, 4, 16.0).step_seconds == pytest.approx(8.3001)
    # on a shared machine the workers compute at 12.8 seq/s (2.5 s) where one alone takes 2 s
    shared = predict(cluster, 2_500_000, "none", 32, 1, 12.8, reference_seq_per_s=16.0)
    assert shared.step_seconds == pytest.approx(2.5 + 0.8001 - 0.625)
    assert shared.scaling_efficiency == pytest.approx(2.0 / (2.5 + 0.8001 - 0.625))
    # 4 hosts, Ethernet framing: each sends 2 x 3/4 x 10 MB of payload, 15 MB x 1514 / 1448 on the wire
    four = allreduce_cost(10e6, ClusterConfig(nodes=4, link="100mbit", latency_us=0.0, mtu=1500))
    assert four.wire_bytes_per_worker == pytest.approx(15e6 * 1514 / 1448)
    assert four.seconds == pytest.approx(15e6 / (12.5e6 * 1448 / 1514))


def test_last_gradients_and_the_hosts_cpu_by_hand():
    # the ring of the case above (10 MB, 2 hosts, 100 Mbit/s: 0.8001 s), overlap 0.5 of a 2 s micro-batch
    cluster = ClusterConfig(nodes=2, link="100mbit", latency_us=50.0, overlap=0.5)
    assert predict(cluster, 2_500_000, "none", 32, 1, 16.0).exposed_communication_seconds == pytest.approx(0.0)
    # but 40% of the bytes come out of backward last: 0.4 x 0.8001 s is sent after it whatever the overlap
    last = predict(cluster, 2_500_000, "none", 32, 1, 16.0, last_fraction=0.4)
    assert last.exposed_communication_seconds == pytest.approx(0.4 * 0.8001)
    # where the overlap leaves more exposed than that, the overlap decides: at 0.1, 0.8001 - 0.2 s
    low = dataclasses.replace(cluster, overlap=0.1)
    assert predict(low, 2_500_000, "none", 32, 1, 16.0, last_fraction=0.4).exposed_communication_seconds == \
        pytest.approx(0.6001)
    # the hosts' CPU: 3 s per GB sent and received; each host sends 10 MB and receives 10 MB: 0.06 s
    busy = dataclasses.replace(cluster, host_cpu_seconds_per_gb=3.0)
    assert predict(busy, 2_500_000, "none", 32, 1, 16.0, last_fraction=0.4).exposed_communication_seconds == \
        pytest.approx(0.4 * 0.8001 + 0.06)
    # after backward too (powersgd, 1 MB: 1 MB each way), and nothing on one host
    assert predict(busy, 2_500_000, "powersgd", 32, 1, 16.0, payload_bytes=1e6).exposed_communication_seconds == \
        pytest.approx(0.08 + 100e-6 + 0.006)
    assert predict(dataclasses.replace(busy, nodes=1), 2_500_000, "none", 32, 1, 16.0).step_seconds == 2.0


def test_last_gradient_fraction_is_the_input_embeddings_share():
    from hvdbert.plan import last_gradient_fraction, trainable_named_shapes

    recipe = load_recipe(TINY)
    named = dict(trainable_named_shapes(recipe))
    embeddings = sum(shape.numel() for name, shape in named.items() if name.startswith("bert.embeddings."))
    assert "cls.predictions.decoder.weight" not in named  # tied: the word embeddings' own gradient
    assert last_gradient_fraction(list(named.items())) == pytest.approx(embeddings / sum(s.numel() for s in named.values()))
    assert 0.3 < last_gradient_fraction(list(named.items())) < 0.7  # the tiny model is mostly its vocabulary


def test_plan_adds_a_fixed_cost_per_optimizer_step():
    from hvdbert.plan import make_plan, predict_cluster

    recipe = load_recipe(TINY)
    plan = make_plan(recipe, 2)
    bare = predict_cluster(recipe, plan, parse_cluster("nodes=2,link=1gbit"), 100.0)
    fixed = predict_cluster(recipe, plan, parse_cluster("nodes=2,link=1gbit,optimizer-seconds=0.25"), 100.0)
    assert fixed["step_seconds"] == pytest.approx(bare["step_seconds"] + 0.25)
    assert fixed["compute_seconds"] == pytest.approx(bare["compute_seconds"] + 0.25)


def test_hierarchical_and_flat_ring_on_gpu_nodes_by_hand():
    # 1 GB on 4 nodes x 8 GPUs, 800 Gbit/s per node (100 GB/s), 2400 Gbit/s in the node (300 GB/s):
    # reduce-scatter and all-gather in the node, 7/8 GB each at 300 GB/s, and across the nodes
    # 2 x 3/4 GB per node at 100 GB/s
    cluster = ClusterConfig(nodes=4, gpus_per_node=8, link="800gbit", intra="2400gbit", latency_us=0.0)
    cost = allreduce_cost(1e9, cluster)
    assert cost.algorithm == "hierarchical"
    assert cost.seconds == pytest.approx(2 * 7 / 8 * 1e9 / 300e9 + 1.5e9 / 100e9)
    assert cost.inter_node_bytes_per_node == pytest.approx(1.5e9)
    # the flat ring over 32 GPUs: 2 x 31/32 GB through each node's link
    ring = allreduce_cost(1e9, ClusterConfig(nodes=4, gpus_per_node=8, link="800gbit", latency_us=2.0,
                                              algorithm="ring"))
    assert ring.seconds == pytest.approx(2 * 31 / 32 * 1e9 / 100e9 + 2 * 31 * 2e-6)
    # one worker: nothing to reduce
    assert allreduce_cost(1e9, ClusterConfig(nodes=1, link="1gbit")).seconds == 0.0


def test_compression_bytes_follow_the_recipe():
    assert compression_of(load_recipe(TINY).dist) == "none"
    assert compression_of(load_recipe(TINY, ["dist.fp16_allreduce=true"]).dist) == "fp16"
    assert compression_of(load_recipe(TINY, ["dist.compression=powersgd"]).dist) == "powersgd"


def test_compressions_that_reduce_after_backward_by_hand():
    # 2 hosts at 100 Mbit/s (12.5 MB/s), 50 us latency, backward hides 0.25 of a 2 s micro-batch
    cluster = ClusterConfig(nodes=2, link="100mbit", latency_us=50.0, overlap=0.25, compressor_seconds=0.1)
    # bf16, 2.5M parameters: 5 MB each, allgathered: each host sends (2 - 1) x 5 MB = 0.4 s + 1 latency;
    # after backward nothing hides it, and the compressor's 0.1 s adds to it
    gather = allgather_cost(5e6, cluster)
    assert gather.seconds == pytest.approx(0.4 + 50e-6) and gather.wire_bytes_per_worker == pytest.approx(5e6)
    bf16 = predict(cluster, 2_500_000, "bf16", 32, 1, 16.0)
    assert bf16.gradient_bytes == 5e6 and bf16.overlap == 0.0
    assert bf16.exposed_communication_seconds == pytest.approx(0.5 + 50e-6)
    assert bf16.step_seconds == pytest.approx(2.5 + 50e-6)
    # 4 hosts: each sends 3 x 5 MB
    assert allgather_cost(5e6, ClusterConfig(nodes=4, link="100mbit", latency_us=0.0)).seconds == pytest.approx(1.2)
    # powersgd: its payload given (1 MB of factors and vectors), one allreduce of 2 x 1/2 x 1 MB
    # = 0.08 s + 2 latencies, not hidden, + 0.1 s
    low = predict(cluster, 2_500_000, "powersgd", 32, 1, 16.0, payload_bytes=1e6)
    assert low.step_seconds == pytest.approx(2.0 + 0.08 + 100e-6 + 0.1) and low.gradient_bytes == 1e6
    with pytest.raises(ValueError, match="give payload_bytes"):
        predict(cluster, 2_500_000, "powersgd", 32, 1, 16.0)
    # one worker reduces nothing: no communication, no compressor
    alone = predict(ClusterConfig(nodes=1, link="1gbit", compressor_seconds=0.1), 2_500_000, "powersgd", 32, 1,
                    16.0, payload_bytes=1e6)
    assert alone.step_seconds == pytest.approx(2.0)


def test_breakeven_rate_by_hand():
    # none 10 MB against powersgd's 1 MB, no latency, 0.25 x 2 s of overlap, 0.1 s of compressor:
    # none exposes 80e6 / B - 0.5 s (B in bit/s), powersgd 8e6 / B + 0.1 s: equal at B = 72e6 / 0.6 = 120 Mbit/s
    cluster = ClusterConfig(nodes=2, link="1gbit", latency_us=0.0, overlap=0.25, compressor_seconds=0.1)
    step = dict(trainable_parameters=2_500_000, micro_batch_size=32, accumulation_steps=1, seq_per_s_per_worker=16.0)
    compared = compare_compressions(cluster, {"none": 10e6, "powersgd": 1e6}, "powersgd", **step)
    assert compared["compression_breakeven_link"] == "120mbit"
    # at 1 Gbit/s none is hidden (0.08 s < 0.5 s): powersgd's 0.108 s make it slower
    assert compared["compression_pays_off"] is False and compared["compression_fastest"] == "none"
    row = compared["compression_table"]["powersgd"]
    assert row["step_seconds"] == pytest.approx(2.108) and row["speedup_over_none"] == pytest.approx(2.0 / 2.108)
    slow = compare_compressions(dataclasses.replace(cluster, link="50mbit"), {"none": 10e6, "powersgd": 1e6},
                                "powersgd", **step)
    # at 50 Mbit/s: none 2 + 1.6 - 0.5 = 3.1 s, powersgd 2 + 0.16 + 0.1 = 2.26 s
    assert slow["compression_pays_off"] is True and slow["compression_fastest"] == "powersgd"
    assert slow["compression_table"]["powersgd"]["speedup_over_none"] == pytest.approx(3.1 / 2.26)
    assert slow["compression_table"]["none"]["breakeven_link"] is None
    # never better (more bytes than none) and always better (none never hidden, nothing added)
    assert breakeven_link(lambda bits: (1.0, 2.0)) is None
    assert breakeven_link(lambda bits: (2.0, 1.0)) == 1e15


@pytest.mark.parametrize("text, message", [
    ("nodes=2", "needs at least nodes=N and link=RATE"),
    ("nodes=2,link=1gbit,speed=3", "'speed=3' is not KEY=VALUE with KEY one of nodes, gpus-per-node, link"),
    ("nodes=two,link=1gbit", "nodes = 'two' is not an integer"),
    ("nodes=0,link=1gbit", "nodes = 0 must be from 1 to"),
    ("nodes=2,link=1gbit,overlap=1.5", "overlap = 1.5 must be from 0 to 1"),
    ("nodes=2,link=1gbit,algorithm=tree", "algorithm = 'tree' is not valid; choose one of auto, ring, hierarchical"),
    ("nodes=2,link=fast", "link rate 'fast'"),
    ("nodes=2,link=1gbit,compressor-seconds=-1", "compressor-seconds = -1.0 must be 0 or more"),
])
def test_bad_clusters_are_refused_in_one_line(text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")) as error:
        parse_cluster(text)
    assert "\n" not in str(error.value)


def test_plan_predicts_on_a_cluster_and_keeps_its_keys(cli):
    plain = cli("hvdbert.plan", ["--recipe", str(TINY), "--workers", "2", "--json"])
    assert plain.returncode == 0, plain.stderr
    outcome = cli("hvdbert.plan", ["--recipe", str(TINY), "--workers", "2", "--json", "--cluster",
                                   "nodes=2,gpus-per-node=1,link=100mbit,latency-us=0,overlap=0",
                                   "--measured-seq-per-s", "32"])
    assert outcome.returncode == 0, outcome.stderr
    result = json.loads(outcome.stdout)
    assert set(json.loads(plain.stdout)) <= set(result)  # plan's keys stay
    # the tiny model's trainable parameters (the MLM-only data freezes pooler and NSP head), as the
    # benchmark counts them on the real model: 958,592 x 4 bytes, at 12.5 MB/s between 2 hosts
    from hvdbert.model import build_model

    model = build_model(load_recipe(TINY).model, with_nsp=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert result["gradient_bytes"] == trainable * 4
    assert result["communication_seconds"] == pytest.approx(trainable * 4 / 12.5e6)
    compute = 16 / 32  # micro-batch 16 of the global 32 per worker, at 32 seq/s
    assert result["scaling_efficiency"] == pytest.approx(compute / (compute + trainable * 4 / 12.5e6))
    # without a measured rate: an A100's peak x MFU over the family's FLOPs per sequence
    gpu = cli("hvdbert.plan", ["--recipe", str(TINY), "--workers", "16", "--set", "batch.micro_batch_size=2",
                               "--cluster", "nodes=2,gpus-per-node=8,link=200gbit", "--json"])
    assert gpu.returncode == 0, gpu.stderr
    assert 0 < json.loads(gpu.stdout)["scaling_efficiency"] <= 1
    assert json.loads(gpu.stdout)["algorithm"] == "hierarchical"


def test_plan_counts_powersgd_on_the_models_shapes_and_says_where_it_pays_off(cli):
    from hvdbert.compression import compressed_bytes
    from hvdbert.model import build_model

    outcome = cli("hvdbert.plan", ["--recipe", str(TINY), "--workers", "2", "--json", "--set",
                                   "dist.compression=powersgd", "--set", "dist.powersgd_rank=4", "--cluster",
                                   "nodes=2,link=10mbit,latency-us=0,overlap=0,compressor-seconds=0.05",
                                   "--measured-seq-per-s", "32"])
    assert outcome.returncode == 0, outcome.stderr
    result = json.loads(outcome.stdout)
    shapes = [p.shape for p in build_model(load_recipe(TINY).model, with_nsp=False).parameters() if p.requires_grad]
    payload = compressed_bytes(shapes, "powersgd", 4)
    assert result["gradient_bytes"] == payload and result["compression"] == "powersgd"
    # 2 hosts at 1.25 MB/s: the payload once each way, after backward, plus the compressor's 0.05 s
    assert result["exposed_communication_seconds"] == pytest.approx(payload / 1.25e6 + 0.05)
    table = result["compression_table"]
    assert set(table) == {"none", "fp16", "bf16", "powersgd"} and "scaling_efficiency" in result
    assert table["none"]["gradient_bytes"] == 4 * sum(s.numel() for s in shapes)
    assert table["bf16"]["wire_bytes_per_worker"] == 2 * sum(s.numel() for s in shapes)  # (2 - 1) x its payload
    assert result["compression_pays_off"] is True and result["compression_fastest"] == "powersgd"
    # with overlap 0, none's step is compute + 8 x none's bytes / B and powersgd's compute + 8 x its
    # payload / B + 0.05 s: equal at B = 8 (none's bytes - payload) / 0.05
    breakeven = 8 * (table["none"]["gradient_bytes"] - payload) / 0.05
    assert rate_bits_per_s(result["compression_breakeven_link"]) == pytest.approx(breakeven, rel=1e-3)


@pytest.mark.parametrize("args, message", [
    (["--workers", "1", "--cluster", "nodes=2,link=1gbit"], "--cluster has nodes x gpus-per-node = 2 x 1 = 2 workers, "
                                                             "--workers 1; make them agree"),
    (["--workers", "2", "--measured-seq-per-s", "3"], "--measured-seq-per-s is an input of the scaling model"),
    (["--workers", "2", "--cluster", "nodes=2,link=1gbit", "--measured-seq-per-s", "0"],
     "the compute rate 0 sequences/s must be greater than 0"),
])
def test_plan_refuses_a_cluster_it_cannot_predict(cli, args, message):
    outcome = cli("hvdbert.plan", ["--recipe", str(TINY), *args])
    assert outcome.returncode == 2
    assert outcome.stderr.strip().count("\n") == 0 and message in outcome.stderr, outcome.stderr


def test_horovod_knobs_are_recipe_keys():
    from hvdbert.dist import horovod_knobs

    assert horovod_knobs(DistConfig(), elastic=False) == {"HOROVOD_FUSION_THRESHOLD": str(64 * 2**20),
                                                          "HOROVOD_CYCLE_TIME": "10.0"}
    dist = load_recipe(TINY, ["dist.cache_capacity=0", "dist.fusion_threshold_mb=8", "dist.cycle_time_ms=2"]).dist
    assert horovod_knobs(dist, elastic=True) == {"HOROVOD_FUSION_THRESHOLD": str(8 * 2**20),
                                                 "HOROVOD_CACHE_CAPACITY": "0"}
    # the autotuner searches fusion threshold and cycle time: neither is fixed for it
    tuned = load_recipe(TINY, ["dist.autotune=true", "dist.autotune_log=/tmp/autotune.csv"]).dist
    assert horovod_knobs(tuned, elastic=False) == {"HOROVOD_AUTOTUNE": "1", "HOROVOD_AUTOTUNE_LOG": "/tmp/autotune.csv"}
    with pytest.raises(UsageError, match="dist.autotune_log = 'x.csv' logs the autotuner's trials, and "
                                         "dist.autotune is false"):
        load_recipe(TINY, ["dist.autotune_log=x.csv"])
    with pytest.raises(UsageError, match="dist.cache_capacity = -1 must be from 0 to"):
        load_recipe(TINY, ["dist.cache_capacity=-1"])
