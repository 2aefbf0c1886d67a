"""Several hosts for real: network namespaces with sshd (tests/netns_cluster.py), SSH between them.

Every job runs as a user would run it: an SSH session into host-a starts the launcher there, which
starts the workers over SSH. Each host prepares the embedded corpus into a cache of its own (no
shared cache; the file system is the machine's, as a shared one would be for data and runs), and
training traffic goes over eth1, the second interface, as docs/clusters.md tells users to select
it. The per-step losses of two hosts must equal those of one host with two workers. An elastic job
grows from host-a and host-b to host-c and shrinks back when rank 0's host leaves the hosts file.

Needs root and `ip netns`; skipped with the reason where they are missing. Each job is bounded in
time; the hosts (namespaces, sshd processes, per-namespace files) are removed at the end, also
after a failure.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (BIN, REPO, assert_each_sample_once_per_epoch, committed_sample_ids, read_metrics,
                      uninterrupted_sample_ids)
from netns_cluster import Cluster, quote, unavailable

pytestmark = pytest.mark.multiprocess

HOSTS = ["host-a", "host-b", "host-c"]  # host-c joins the elastic test only
STEPS = 8
BUILTIN_DOCUMENTS = 1500  # of the embedded corpus: enough for every job here
STALL_SECONDS = 10  # dist.stall_timeout_seconds in the fault tests: far above a tiny step's waits
FAULT_STEPS, FAULT_CHECKPOINT_EVERY = 40, 5


def pretrain_args(output: Path, steps: int = STEPS, *extra: str) -> list[str]:
    return ["--recipe", "recipes/tiny.toml", "--output", str(output), "--set", "train.progress_bar=false",
            "--set", f"data.builtin_max_documents={BUILTIN_DOCUMENTS}", "--set", "train.log_every=1",
            "--set", f"train.max_steps={steps}", *extra]


def fault_args(output: Path) -> list[str]:
    return pretrain_args(output, FAULT_STEPS, "--set", f"checkpoint.every_steps={FAULT_CHECKPOINT_EVERY}",
                         "--set", "checkpoint.keep=20", "--set", f"dist.stall_timeout_seconds={STALL_SECONDS}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if not (BIN / "horovodrun").is_file():
        pytest.skip(f"horovodrun is not installed next to {sys.executable}")
    workdir = tmp_path_factory.mktemp("hosts")
    hosts = Cluster(workdir, HOSTS)
    try:
        # The interpreter every worker runs: this checkout's hvdbert, and a cache of the host's own.
        wrapper = workdir / "python"
        wrapper.write_text("#!/bin/sh\n"
                           f"export PYTHONPATH={REPO} PYTHONUNBUFFERED=1\n"
                           f"export HVDBERT_CACHE={workdir}/cache-$(hostname)\n"
                           f'exec {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
        hosts.python = str(wrapper)
        hostfile = workdir / "hostfile"
        hostfile.write_text("# the training hosts\nhost-a slots=1\nhost-b slots=1\n")
        hosts.hostfile = str(hostfile)
        yield hosts
    finally:
        hosts.close()


def on_host_command(cluster: Cluster, name: str, words: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The ssh command line that runs `words` on host `name`, in the checkout, with the venv on PATH."""
    settings = {"PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", **(env or {})}
    exports = " ".join(f"{k}={quote([v])}" for k, v in settings.items())
    return cluster.ssh_command(name, f"cd {quote([REPO])} && env {exports} {quote(words)}")


def on_host(cluster: Cluster, name: str, words: list[str], env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    command = on_host_command(cluster, name, words, env)
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    finally:
        cluster.kill_processes(name)  # whatever a failed or timed-out job left behind


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def launcher_env(cluster: Cluster) -> dict[str, str]:
    return {"PYTHON": cluster.python, "HOROVODRUN": str(BIN / "horovodrun"), "MPIRUN": "mpirun"}


@pytest.fixture(scope="module")
def one_host(cluster, tmp_path_factory):
    """Per-step losses of one host with two workers (host-a, -H localhost:2), for STEPS and for the
    fault tests' longer run."""
    root = tmp_path_factory.mktemp("one-host")
    found = {}
    for name, args in (("short", pretrain_args(root / "short")), ("faults", fault_args(root / "faults"))):
        result = on_host(cluster, "host-a", [str(BIN / "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2",
                                             cluster.python, "-m", "hvdbert.pretrain", *args])
        assert result.returncode == 0, result.stderr[-3000:]
        found[name] = losses(root / name)
    assert len(found["short"]) == STEPS and len(found["faults"]) == FAULT_STEPS
    return found


def traffic(cluster: Cluster, name: str) -> dict[str, int]:
    return {dev: cluster.bytes_sent(name, dev) for dev in ("eth0", "eth1")}


def assert_trained_over(device: str, before: dict[str, int], after: dict[str, int]) -> None:
    # The tiny model's gradients are about 4 MB a step; SSH and the launchers' own messages are small.
    sent = {dev: after[dev] - before[dev] for dev in before}
    other = "eth0" if device == "eth1" else "eth1"
    print(f"host-b sent: {sent}")
    assert sent[device] > STEPS * 1_000_000 and sent[device] > 5 * sent[other], sent


def test_horovodrun_gloo_on_two_hosts_equals_one_host(cluster, one_host, tmp_path):
    before = traffic(cluster, "host-b")
    result = on_host(cluster, "host-a", [
        str(BIN / "horovodrun"), "--gloo", "-np", "2", "-H", "host-a:1,host-b:1", "--network-interface", "eth1",
        cluster.python, "-m", "hvdbert.pretrain", *pretrain_args(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-3000:]
    # Horovod 0.28.1's Gloo sends tensors from the address each host's own name resolves to (its
    # process-set contexts ignore HOROVOD_GLOO_IFACE; docs/clusters.md): here eth0, whatever
    # --network-interface says. When Horovod fixes that, this fails and the docs need changing.
    assert_trained_over("eth0", before, traffic(cluster, "host-b"))
    # each host prepared the embedded corpus itself, into its own cache, and got the same bytes
    caches = [Path(cluster.workdir) / f"cache-{name}" for name in ("host-a", "host-b")]
    manifests = [list(cache.glob("data/builtin-*/manifest.json")) for cache in caches]
    assert all(len(m) == 1 for m in manifests)
    assert manifests[0][0].read_bytes() == manifests[1][0].read_bytes()
    assert losses(tmp_path / "run") == one_host["short"]


def test_multinode_sh_mpi_with_a_hostfile_equals_one_host(cluster, one_host, tmp_path):
    before = traffic(cluster, "host-b")
    result = on_host(cluster, "host-a", ["launch/multinode.sh", "--hostfile", cluster.hostfile, "--mpi",
                                         "--nic", "eth1", *pretrain_args(tmp_path / "run")], launcher_env(cluster))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trained_over("eth1", before, traffic(cluster, "host-b"))
    assert losses(tmp_path / "run") == one_host["short"]


def test_mpirun_sh_with_a_hostfile_equals_one_host(cluster, one_host, tmp_path):
    before = traffic(cluster, "host-b")
    result = on_host(cluster, "host-a", ["launch/mpirun.sh", "--hostfile", cluster.hostfile, "--nic", "eth1",
                                         *pretrain_args(tmp_path / "run")], launcher_env(cluster))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_trained_over("eth1", before, traffic(cluster, "host-b"))
    assert losses(tmp_path / "run") == one_host["short"]


def test_bytes_on_a_shaped_link_match_the_scaling_model(cluster, tmp_path):
    """The benchmark's measured loop on two hosts whose links run at 200 Mbit/s (tbf, both ends): the
    bytes each host's interfaces sent per timed step are the scaling model's ring allreduce of the
    model's fp32 gradients, 2 (N - 1) / N x 4 bytes x trainable parameters, and at most that with
    every frame's Ethernet/IP/TCP headers (veth counts a 64 KiB GSO segment's headers once)."""
    from hvdbert.bench.orchestrate import bench_overrides
    from hvdbert.config import ClusterConfig
    from hvdbert.scaling import ETHERNET_HEADER_BYTES, predict

    steps, warmup = 3, 1
    result = tmp_path / "bench.json"
    overrides = bench_overrides(None, 2, steps + warmup, ["data.builtin_max_documents=1500"], "recipes/tiny.toml")
    cluster.shape("200mbit")
    try:
        before = cluster.bytes_sent("host-b", "eth0")
        run = on_host(cluster, "host-a", [
            str(BIN / "horovodrun"), "--gloo", "-np", "2", "-H", "host-a:1,host-b:1", cluster.python, "-m",
            "hvdbert.bench", "--recipe", "recipes/tiny.toml", "--steps", str(steps), "--warmup-steps", str(warmup),
            "--worker", str(result), *(a for s in overrides for a in ("--set", s))])
        sent = cluster.bytes_sent("host-b", "eth0") - before
    finally:
        cluster.shape(None)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(result.read_text())
    payload, framed = (predict(ClusterConfig(nodes=2, link="200mbit", mtu=mtu), record["trainable_parameters"], "none",
                               record["micro_batch_size"], 1, record["seq_per_s_per_worker"]).wire_bytes_per_worker
                       for mtu in (0, 1500))
    assert payload == record["trainable_parameters"] * 4  # 2 hosts: each sends 2 x 1/2 of the gradients
    counted = record["wire_tx_bytes_per_rank_per_step"]
    print(f"wire bytes per host and step: counted {counted:,.0f}, model {payload:,.0f} ({framed:,.0f} with every "
          f"frame's headers); host-b sent {sent:,} over the whole job")
    assert 0.99 * payload <= counted <= 1.01 * framed
    # packets are the sends the interface was handed: each at most 64 KiB (GSO) and its Ethernet header,
    # at least an Ethernet, IPv4 and TCP header (54 bytes)
    packets = record["wire_tx_packets_per_rank_per_step"]
    assert counted / (65_535 + ETHERNET_HEADER_BYTES) <= packets <= counted / 54, packets
    # seen from outside the job too: host-b sent at least the timed steps' allreduces
    assert sent > steps * payload


# --- faults ---------------------------------------------------------------------------------------

def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.is_file() else 0


def worker_pid(cluster: Cluster, name: str, run_dir: Path) -> int | None:
    """The hvdbert.pretrain worker on host `name` for this run."""
    for pid in cluster.pids(name):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hvdbert.pretrain" in command and str(run_dir).encode() in command \
                and not any(b"horovodrun" in word or b"mpirun" in word for word in command):
            return pid
    return None


def run_until_fault(cluster: Cluster, launcher: list[str], env: dict[str, str], run_dir: Path, fault) -> tuple[int, float, str]:
    """Start the job on host-a, apply `fault` once 12 steps are logged (two checkpoints written), and
    return (exit status, seconds from the fault to the launcher's exit, its output)."""
    log_path = run_dir.parent / f"{run_dir.name}.log"
    with open(log_path, "w") as log:
        job = subprocess.Popen(on_host_command(cluster, "host-a", launcher, env), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while steps_logged(run_dir) < 12 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert job.poll() is None and steps_logged(run_dir) >= 12, log_path.read_text()[-3000:]
        fault()
        faulted = time.monotonic()
        # The bound on this test: the stall bound, plus the launcher's teardown.
        status = job.wait(timeout=STALL_SECONDS + 120)
        return status, time.monotonic() - faulted, log_path.read_text()
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
        for name in ("host-a", "host-b"):
            cluster.kill_processes(name)


def assert_resumes_exactly(cluster: Cluster, launcher: list[str], env: dict[str, str], run_dir: Path,
                           reference: list[float], stopped_at: int) -> None:
    from hvdbert.checkpoint import open_checkpoint, step_dirs

    newest_step, newest = step_dirs(run_dir)[-1]
    open_checkpoint(newest)  # complete: every file's sha256 checks out
    assert newest_step <= stopped_at
    result = on_host(cluster, "host-a", [*launcher, "--resume", "auto"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {newest}" in result.stderr + result.stdout
    assert losses(run_dir) == reference


def test_cut_link_ends_the_job_and_resume_continues_exactly(cluster, one_host, tmp_path):
    run_dir = tmp_path / "run"
    launcher = ["launch/multinode.sh", "--hostfile", cluster.hostfile, "--nic", "eth1", *fault_args(run_dir)]
    env = launcher_env(cluster)
    def cut() -> None:  # host-b loses both its networks, as when its switch port or cable fails
        for dev in ("eth0", "eth1"):
            cluster.link("host-b", dev, up=False)

    try:
        status, seconds, output = run_until_fault(cluster, launcher, env, run_dir, cut)
    finally:
        for dev in ("eth0", "eth1"):
            cluster.link("host-b", dev, up=True)
    stopped_at = steps_logged(run_dir)
    print(f"links of host-b cut after {stopped_at} steps: job exited {status} {seconds:.1f} s later")
    assert status != 0, output[-3000:]
    assert_resumes_exactly(cluster, launcher, env, run_dir, one_host["faults"], stopped_at)


def test_frozen_worker_under_mpirun_ends_the_job_and_resume_continues_exactly(cluster, one_host, tmp_path):
    run_dir = tmp_path / "run"
    launcher = ["launch/mpirun.sh", "--hostfile", cluster.hostfile, "--nic", "eth1", *fault_args(run_dir)]
    env = launcher_env(cluster)
    frozen = []

    def freeze() -> None:
        pid = worker_pid(cluster, "host-b", run_dir)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        frozen.append(pid)

    try:
        status, seconds, output = run_until_fault(cluster, launcher, env, run_dir, freeze)
    finally:
        for pid in frozen:  # never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    stopped_at = steps_logged(run_dir)
    print(f"worker on host-b frozen after {stopped_at} steps: job exited {status} {seconds:.1f} s later")
    assert status != 0, output[-3000:]
    assert f"longer than dist.stall_timeout_seconds = {STALL_SECONDS}" in output, output[-3000:]
    assert_resumes_exactly(cluster, launcher, env, run_dir, one_host["faults"], stopped_at)


# --- elastic: a host joins, a host leaves -----------------------------------------------------------

ELASTIC_STEPS, ELASTIC_COMMIT_EVERY = 40, 2
ELASTIC_GLOBAL_BATCH, ELASTIC_MICRO = 48, 8  # 6 micro-batches a step: 2 workers x 3, or 3 x 2


def last_record_per_step(run_dir: Path) -> dict[int, dict]:
    """Steps redone after a rollback are logged again: the last record of a step is the committed one."""
    return {r["step"]: r for r in read_metrics(run_dir)} if (run_dir / "metrics.jsonl").is_file() else {}


def write_hosts(path: Path, hosts: list[str]) -> None:
    # as docs/clusters.md tells cluster tooling to: a new file renamed over the old one
    temporary = path.with_name(path.name + ".new")
    temporary.write_text("".join(f"{name}:1\n" for name in hosts))
    os.replace(temporary, path)


def elastic_launcher(run_dir: Path, *extra: str, min_np: int = 2, max_np: int = 3) -> list[str]:
    """multinode.sh --elastic for 2 one-slot hosts at first, on the training network."""
    return ["launch/multinode.sh", "--elastic", "-n", "2", "--min-np", str(min_np), "--max-np", str(max_np),
            "--nic", "eth1",
            *pretrain_args(run_dir, ELASTIC_STEPS, "--set", f"batch.global_batch_size={ELASTIC_GLOBAL_BATCH}",
                           "--set", f"batch.micro_batch_size={ELASTIC_MICRO}",
                           "--set", f"elastic.commit_every={ELASTIC_COMMIT_EVERY}", *extra)]


class ElasticJob:
    """An elastic job started over SSH on host `on` (host-a unless said), its output in a log file."""

    def __init__(self, cluster: Cluster, launcher: list[str], hosts_file: Path, log_path: Path, on: str = "host-a",
                 env: dict[str, str] | None = None):
        env = {**launcher_env(cluster), "HVDBERT_HOSTS_FILE": str(hosts_file), **(env or {})}
        self.log_path = log_path
        self.started = time.monotonic()
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(on_host_command(cluster, on, launcher, env), stdout=log,
                                            stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, condition, what: str, seconds: float = 240) -> None:
        deadline = time.monotonic() + seconds
        while not condition() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert condition(), f"{what}: job exit {self.process.poll()}\n{self.output()[-4000:]}"

    def say(self, what: str) -> None:
        print(f"{time.monotonic() - self.started:.0f} s: {what}")

    def stop(self, cluster: Cluster) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for name in HOSTS:
            cluster.kill_processes(name)


def test_elastic_job_grows_to_a_third_host_and_shrinks_back(cluster, tmp_path):
    """multinode.sh --elastic on host-a and host-b; host-c is added to the hosts file once steps are
    logged (3 workers), then rank 0's host is removed (2 workers), and the job finishes."""
    from hvdbert.data.shards import PreparedData
    from hvdbert.runlock import check_free
    from hvdbert.errors import UsageError

    run_dir, hosts_file = tmp_path / "run", tmp_path / "hosts"
    write_hosts(hosts_file, ["host-a", "host-b"])
    launcher = elastic_launcher(run_dir, "--set", "checkpoint.every_steps=10", "--set", "checkpoint.keep=20",
                                "--set", "data.record_sample_ids=true")
    job = ElasticJob(cluster, launcher, hosts_file, tmp_path / "elastic.log")
    started, wait_for = job.started, job.wait_for

    def workers_at_last_step() -> int:
        records = last_record_per_step(run_dir)
        return records[max(records)]["workers"] if records else 0

    try:
        wait_for(lambda: len(last_record_per_step(run_dir)) >= 4, "4 steps on two hosts")
        job.say(f"{len(last_record_per_step(run_dir))} steps on two hosts")
        write_hosts(hosts_file, ["host-a", "host-b", "host-c"])
        grown_at = max(last_record_per_step(run_dir))
        job.say(f"host-c added after step {grown_at}")
        wait_for(lambda: workers_at_last_step() == 3, "the job grows to host-c")
        job.say("3 workers")
        wait_for(lambda: sum(r["workers"] == 3 for r in last_record_per_step(run_dir).values()) >= 4,
                 "steps on three hosts")
        # Horovod orders the first hosts as it likes: find rank 0's host (it holds the lock) and remove it.
        leaving = (run_dir / "lock").read_text().split()[3]
        assert leaving in ("host-a", "host-b"), leaving
        write_hosts(hosts_file, [name for name in HOSTS if name != leaving])
        shrunk_at = max(last_record_per_step(run_dir))
        job.say(f"{leaving} removed after step {shrunk_at}")
        wait_for(lambda: workers_at_last_step() == 2, f"the job shrinks without {leaving}")
        job.say("2 workers")
        # The new rank 0, on another host, holds the run directory's lock: another run is refused.
        with pytest.raises(UsageError, match="in use by another run"):
            check_free(run_dir)
        assert job.process.poll() is None  # (the job had many steps left: the lock was held while it ran)
        status = job.process.wait(timeout=300)
    finally:
        job.stop(cluster)
    seconds = time.monotonic() - started
    output = job.output()
    assert status == 0, output[-4000:]

    records = read_metrics(run_dir)
    committed = last_record_per_step(run_dir)
    workers = [committed[s]["workers"] for s in sorted(committed)]
    phases = [w for k, w in enumerate(workers) if k == 0 or w != workers[k - 1]]
    print(f"elastic across hosts: {seconds:.0f} s; host-c added after step {grown_at}, {leaving} removed after "
          f"step {shrunk_at}; workers by step {workers}; {len(records)} records for {len(committed)} steps")
    assert sorted(committed) == list(range(1, ELASTIC_STEPS + 1))
    assert phases == [2, 3, 2], workers
    assert all(r["samples_seen"] == r["step"] * ELASTIC_GLOBAL_BATCH for r in committed.values())
    assert all(r["global_batch_size"] == ELASTIC_GLOBAL_BATCH for r in records)
    assert {(r["workers"], r["accumulation_steps"]) for r in records} == {(2, 3), (3, 2)}
    assert f"hvdbert: done: {ELASTIC_STEPS} steps, {ELASTIC_STEPS * ELASTIC_GLOBAL_BATCH} samples seen" in output
    assert f"preparing the embedded corpus in {cluster.workdir}/cache-host-c/" in output
    assert "hvdbert: rank 0 is now pid" in output  # the new rank 0 took the run directory's lock over
    # host-c prepared the embedded corpus into its own cache when it joined, and got the same bytes
    manifests = [sorted((Path(cluster.workdir) / f"cache-{name}").glob("data/builtin-*/manifest.json"))
                 for name in HOSTS]
    assert all(len(m) == 1 for m in manifests), manifests
    assert manifests[0][0].read_bytes() == manifests[1][0].read_bytes() == manifests[2][0].read_bytes()
    # The lock file names the run's last rank 0, a worker on a host that stayed.
    last_holder = (run_dir / "lock").read_text().split()[3]
    assert last_holder != leaving and last_holder in HOSTS, last_holder

    # No sample read twice: the committed history in the ranks' logs holds, at every step, exactly
    # the samples of that step's global positions, as an uninterrupted run reads them.
    data = PreparedData(manifests[0][0].parent)
    seed = json.loads((run_dir / "recipe.json").read_text())["train"]["seed"]
    per_step = committed_sample_ids(run_dir, ELASTIC_STEPS)
    per_epoch = assert_each_sample_once_per_epoch(
        per_step, uninterrupted_sample_ids(len(data), seed, ELASTIC_GLOBAL_BATCH, ELASTIC_STEPS))
    ids = [i for step_ids in per_step for i in step_ids]
    print(f"sample ids: {len(ids)} read over {ELASTIC_STEPS} steps, {len(set(ids))} distinct, "
          f"{len(data)} samples in the data, read per epoch {per_epoch}")
    assert len(ids) == ELASTIC_STEPS * ELASTIC_GLOBAL_BATCH



def test_elastic_job_outwaits_a_frozen_rank_0_then_refuses_a_joiner_with_other_data(cluster, tmp_path):
    """One elastic job, launched from host-c on host-a and host-b, meets two hazards in turn.

    Rank 0's process freezes (SIGSTOP: a hung file system, a swapping host) and its host is taken out
    of the job. Horovod's elastic driver re-forms the job only once every worker of the old one has
    ended, so the other worker, past Gloo's timeout, waits without training. When the frozen
    process ends (kill -9), the job re-forms on one worker, which becomes rank 0 and takes the run
    directory's lock over (it would wait elastic.lock_wait_seconds for a lock not yet released).

    Then host-c joins, but its cache holds another preparation of the embedded corpus under the
    name the recipe asks for (a stale or hand-copied cache): the agreement check before the state
    sync stops every worker with rank 0's one line naming host-c, horovodrun's elastic driver ends
    without waiting for hosts, and the run directory keeps its checkpoints for a --resume auto."""
    from hvdbert.checkpoint import latest_checkpoint
    from hvdbert.prepare import builtin_cache_dir, prepare_builtin

    run_dir, hosts_file = tmp_path / "run", tmp_path / "hosts"
    # the name under which the tiny recipe (vocabulary 4096, sequence 64) looks for its documents
    other = builtin_cache_dir(Path(cluster.workdir) / "cache-host-c" / "data", 4096, 64, BUILTIN_DOCUMENTS)
    shutil.rmtree(other, ignore_errors=True)  # (the elastic test's host-c prepared the right one there)
    prepare_builtin(other, 4096, 64, max_documents=BUILTIN_DOCUMENTS - 100)
    write_hosts(hosts_file, ["host-a", "host-b"])
    # A collective that waits for the frozen rank ends at Gloo's timeout (HOROVOD_GLOO_TIMEOUT_SECONDS,
    # 30 s by default: shortened here; it also bounds the rendezvous of a joining worker).
    job = ElasticJob(cluster, elastic_launcher(run_dir, "--set", "checkpoint.every_steps=4", min_np=1, max_np=2),
                     hosts_file, tmp_path / "elastic.log", on="host-c", env={"HOROVOD_GLOO_TIMEOUT_SECONDS": "20"})
    frozen = None
    try:
        job.wait_for(lambda: steps_logged(run_dir) >= 4, "4 steps on two hosts")
        holder = (run_dir / "lock").read_text().split()  # pid N on HOST since ...
        frozen, leaving = int(holder[1]), holder[3]
        staying = "host-b" if leaving == "host-a" else "host-a"
        os.kill(frozen, signal.SIGSTOP)
        write_hosts(hosts_file, [staying])
        frozen_at = steps_logged(run_dir)
        job.say(f"rank 0 (pid {frozen} on {leaving}) frozen and its host removed after step {frozen_at}")
        # Gloo's timeout reads as an allreduce's "Timed out waiting ... for recv", or as "Application
        # timeout caused pair closure" where the frozen rank stopped inside Horovod's negotiation.
        job.wait_for(lambda: any(form in job.output() for form in ("Timed out waiting", "Application timeout")),
                     "Gloo's timeout on the other worker")
        time.sleep(5)
        assert job.process.poll() is None and steps_logged(run_dir) <= frozen_at + ELASTIC_COMMIT_EVERY
        assert "elastic reset" not in job.output()
        job.say(f"no reset while the frozen process lives: {steps_logged(run_dir)} steps logged")
        os.kill(frozen, signal.SIGKILL)
        job.wait_for(lambda: "hvdbert: rank 0 is now pid" in job.output() and steps_logged(run_dir) >= frozen_at + 4,
                     "the job goes on with one worker")
        job.say(f"one worker, rank 0 on {staying}, after step {steps_logged(run_dir)}")
        write_hosts(hosts_file, [staying, "host-c"])
        status = job.process.wait(timeout=240)
        job.say(f"host-c joined; the job ended with status {status}")
    finally:
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
        job.stop(cluster)
    output = job.output()
    assert "hvdbert: rank 0 is now pid" in output and f"on {staying}; it holds {run_dir}/lock" in output
    assert "hvdbert: elastic reset: now 1 workers, accumulation 6" in output
    refusals = [line for line in output.splitlines() if "hvdbert.pretrain: error:" in line]
    assert status != 0 and len(refusals) == 1, output[-4000:]
    assert "rank 1 (host host-c) has another prepared data (manifest.json" in refusals[0], refusals[0]
    # Both workers exit 2 at once; horovodrun's elastic driver then ends (status 1) with a report and
    # a traceback of its own, at once: it does not wait for other hosts (HOROVOD_ELASTIC_TIMEOUT, 600 s).
    assert "exit with status code 2" in output and "Exit code: 2" in output, output[-4000:]
    assert not any("Traceback" in line for line in output.splitlines() if line.startswith(("[0]<", "[1]<")))
    assert latest_checkpoint(run_dir).step >= frozen_at + 4
    committed = last_record_per_step(run_dir)
    assert sorted(committed) == list(range(1, max(committed) + 1))
    assert {committed[step]["workers"] for step in committed if step > frozen_at + ELASTIC_COMMIT_EVERY} == {1}
