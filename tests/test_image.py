"""The image itself, built by `make image` (tools/build-image.sh) and run with the engine that built it.

Inside the image: `horovodrun --check-build`, the layout a user relies on (a non-root user who owns
the checkout, no build leftovers in it), `hvdbert.plan`, and the Dockerfile header's commands that
need no GPU, run as written with the engine's name for `docker`. Across containers: two containers on
a container network, each running the image's sshd as the docs say, run one job over SSH with
`launch/multinode.sh` (horovodrun, Gloo) and with `launch/mpirun.sh`, and their losses equal those of
one container with two workers; a container killed mid-run ends the job within the stall bound, and
`--resume auto` then continues to the same losses.

Run by `make image-test` (marker `image`; `make test` leaves these out): HVDBERT_IMAGE names the
image (hvdbert:cpu), HVDBERT_IMAGE_ENGINE the engine (default: docker when its daemon answers, else
podman). Every container and network made here is removed at the end, also after a failure.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.image, pytest.mark.multiprocess]

IMAGE = os.environ.get("HVDBERT_IMAGE", "")
STEPS, CHECKPOINT_EVERY, KILL_AFTER = 12, 4, 6
STALL_SECONDS = 20  # dist.stall_timeout_seconds of the killed job
TEARDOWN_SECONDS = 30  # what the bound allows beyond it: the watchdog's look, the launcher's teardown
# The tiny recipe, short: a shared corpus cache (prepared once by the first job), every step logged.
TRAIN = ["--set", "train.progress_bar=false", "--set", "data.builtin_max_documents=1500",
         "--set", "train.log_every=1", "--set", f"train.max_steps={STEPS}",
         "--set", f"checkpoint.every_steps={CHECKPOINT_EVERY}", "--set", "checkpoint.keep=10"]
CACHE_ENV = ["-e", "HVDBERT_CACHE=/shared/cache"]


def find_engine() -> str | None:
    named = os.environ.get("HVDBERT_IMAGE_ENGINE")
    if named:
        return named
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    return shutil.which("podman") and "podman"


ENGINE = find_engine()


def engine(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{ENGINE} {shlex.join(args)} exited {result.returncode}:\n" \
                                       f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module", autouse=True)
def image():
    if not IMAGE:
        pytest.skip("the image tests run under `make image-test` (HVDBERT_IMAGE names the image)")
    assert ENGINE, "no container engine (docker or podman)"
    engine("image", "inspect", IMAGE, timeout=60)
    return IMAGE


def losses(run_dir: Path) -> list[float]:
    """Per step, the last logged loss (a step redone after a resume replaces the earlier record)."""
    by_step = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "step" in record:
            by_step[record["step"]] = record["loss"]
    return [by_step[step] for step in sorted(by_step)]


def test_check_build_user_and_checkout():
    script = ("horovodrun --check-build; echo uid=$(id -u) user=$(id -un); "
              "echo owner=$(stat -c %U /opt/hvdbert) pwd=$(pwd); ls -a /opt/hvdbert; "
              "mkdir -p runs/probe && echo writable")
    out = engine("run", "--rm", IMAGE, "bash", "-c", script, timeout=120).stdout
    for piece in ("PyTorch", "MPI", "Gloo"):
        assert re.search(rf"\[X\] {piece}\b", out), out
    assert "uid=1000 user=hvdbert" in out and "owner=hvdbert pwd=/opt/hvdbert" in out, out
    # pip built the package from a copy: no root-owned build leftovers in the checkout.
    listing = out.split("pwd=/opt/hvdbert", 1)[1].split()
    assert "build" not in listing and not any(name.endswith(".egg-info") for name in listing), listing
    assert "writable" in out, out


def test_plan_runs_in_the_image():
    result = engine("run", "--rm", IMAGE, "python", "-m", "hvdbert.plan", "--recipe", "recipes/tiny.toml",
                    "--workers", "2", timeout=120)
    assert "global" in result.stdout.lower(), result.stdout
    refused = engine("run", "--rm", IMAGE, "launch/local.sh", "-n", "3", timeout=120, check=False)
    assert refused.returncode == 2 and "worker counts that work nearby: 2" in refused.stderr, refused.stderr


def header_commands() -> list[list[str]]:
    """The `docker run` commands of the Dockerfile's header that need no GPU, as argument lists."""
    commands = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text.startswith("docker run") and "--gpus" not in text:
            commands.append(shlex.split(text)[1:])
    return commands


def test_the_dockerfile_header_commands_run_as_written():
    commands = header_commands()
    assert commands, "the Dockerfile's header shows no command for the cpu variant"
    for args in commands:
        # The tag the header names is the one `make image` gives the cpu variant.
        tag = next(a for a in args if a.startswith("hvdbert"))
        if tag != IMAGE:
            engine("tag", IMAGE, tag, timeout=60)
        try:
            result = engine(*args, timeout=900)
        finally:
            if tag != IMAGE:
                engine("rmi", tag, timeout=60, check=False)
        assert re.search(r"step\s*=?\s*\d+", result.stdout + result.stderr), result.stdout[-2000:]


@pytest.fixture(scope="module")
def containers(tmp_path_factory):
    """Two containers, node-a and node-b, on a network of their own, running the image's sshd with a
    fresh key pair (mounted at /home/hvdbert/.ssh), sharing /shared (runs and the corpus cache)."""
    tag = uuid.uuid4().hex[:8]
    network, subnet = f"hvdbert-test-{tag}", f"10.89.{int(tag[:2], 16) % 200 + 20}"
    shared = tmp_path_factory.mktemp("shared")
    keys = shared / "keys"
    keys.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-N", "", "-f", str(keys / "id_rsa")], check=True)
    shutil.copy(keys / "id_rsa.pub", keys / "authorized_keys")
    for path in [shared, *shared.rglob("*")]:
        os.chown(path, 1000, 1000)
    nodes = {"node-a": f"{subnet}.2", "node-b": f"{subnet}.3"}
    names = {node: f"{node}-{tag}" for node in nodes}
    hosts = [arg for node, ip in nodes.items() for arg in ("--add-host", f"{node}:{ip}")]
    engine("network", "create", network, "--subnet", f"{subnet}.0/24", timeout=60)
    try:
        for number, (node, ip) in enumerate(nodes.items()):
            # A fixed MAC address too: a container started again is then found at once, without
            # waiting for the other's neighbour table to forget the old one.
            mac = f"02:42:0a:59:{int(tag[:2], 16):02x}:{number + 2:02x}"
            engine("run", "-d", "--name", names[node], "--hostname", node, "--network", network, "--ip", ip,
                   "--mac-address", mac,
                   *hosts, "--shm-size", "1g", "-v", f"{keys}:/home/hvdbert/.ssh", "-v", f"{shared}:/shared",
                   IMAGE, "/usr/sbin/sshd", "-De", "-f", "/home/hvdbert/.sshd_config", timeout=120)
        # Each node reaches the other's sshd (the image's client defaults to its port).
        for node in nodes:
            engine("exec", names["node-a"], "ssh", node, "true", timeout=60)
        yield names, shared
    finally:
        for name in names.values():
            engine("rm", "-f", "-t", "0", name, timeout=120, check=False)
        engine("network", "rm", "-f", network, timeout=60, check=False)


def exec_in(names, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    return engine("exec", *CACHE_ENV, names["node-a"], *args, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def one_host(containers) -> list[float]:
    """The reference: two workers in one container."""
    names, shared = containers
    exec_in(names, "launch/local.sh", "-n", "2", "--output", "/shared/runs/one", *TRAIN)
    result = losses(shared / "runs" / "one")
    assert len(result) == STEPS
    return result


@pytest.mark.parametrize("launcher", ["multinode.sh", "mpirun.sh"])
def test_two_containers_run_one_job_over_ssh(containers, one_host, launcher):
    names, shared = containers
    run = f"/shared/runs/{launcher.split('.')[0]}"
    exec_in(names, f"launch/{launcher}", "-H", "node-a:1,node-b:1", "--output", run, *TRAIN)
    assert losses(shared / "runs" / launcher.split(".")[0]) == one_host


def test_a_killed_container_ends_the_job_within_the_stall_bound_and_resume_continues(containers, one_host):
    names, shared = containers
    run_dir = shared / "runs" / "killed"
    args = ["launch/multinode.sh", "-H", "node-a:1,node-b:1", "--output", "/shared/runs/killed", *TRAIN,
            "--set", f"dist.stall_timeout_seconds={STALL_SECONDS}"]
    job = subprocess.Popen([ENGINE, "exec", *CACHE_ENV, names["node-a"], *args],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not ((run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= KILL_AFTER):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[0][-3000:]
            time.sleep(0.5)
        engine("kill", names["node-b"], timeout=60)
        killed = time.monotonic()
        output = job.communicate(timeout=STALL_SECONDS + TEARDOWN_SECONDS + 60)[0]
        ended = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0, output[-3000:]
    assert ended <= STALL_SECONDS + TEARDOWN_SECONDS, f"the job ended {ended:.1f} s after the kill"
    print(f"the job ended {ended:.1f} s after node-b was killed (exit {job.returncode})")
    assert len(losses(run_dir)) < STEPS
    # node-b comes back (its sshd); the job continues from the newest complete checkpoint.
    engine("start", names["node-b"], timeout=120)
    deadline = time.monotonic() + 120
    while engine("exec", names["node-a"], "ssh", "-o", "ConnectTimeout=5", "node-b", "true", timeout=60,
                 check=False).returncode != 0:
        assert time.monotonic() < deadline, "node-b's sshd did not come back"
        time.sleep(1)
    resumed = exec_in(names, *args, "--resume", "auto")
    found = re.search(r"resumed from /shared/runs/killed/checkpoints/step-(\d+)", resumed.stdout + resumed.stderr)
    assert found and 0 < int(found.group(1)) < STEPS, (resumed.stdout + resumed.stderr)[-3000:]
    assert losses(run_dir) == one_host
