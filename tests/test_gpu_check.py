"""tools/gpu-check.sh without a GPU: its dry run prints every command of the check (the Horovod build
for the GPU's own compute capability from the carried sdist, check-build, the GPU tests, the four
BERT-large bench runs, the report) after checking its inputs, and refuses missing or oversized ones
in one line. The carried directory here holds files named as `--prepare` names them (the real ones
come from PyPI, which the suite does not reach)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = REPO / "tools" / "gpu-check.sh"
CARRIED = ["horovod-{horovod}.tar.gz", "torch_optimi-0.3.3-py3-none-any.whl",
           "cffi-2.1.1-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", "pycparser-3.12-py3-none-any.whl"]


def horovod_pin() -> str:
    return re.search(r"^horovod==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)


def carry_dir(tmp_path, leave_out: str | None = None):
    carry = tmp_path / "carry"
    carry.mkdir()
    for name in CARRIED:
        if name != leave_out:
            (carry / name.format(horovod=horovod_pin())).write_bytes(b"x")
    return carry


def gpu_check(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path / "out"))
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120)


def test_dry_run_prints_every_command_of_the_check(tmp_path):
    carry = carry_dir(tmp_path)
    result = gpu_check("--dry-run", str(carry), tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    build = next(c for c in commands if "tools/build-horovod.sh nccl" in c)
    assert "/venv/bin/python" in build and not (tmp_path / "out").exists()  # nothing ran
    env = next(c for c in commands if c.startswith("export "))
    # Offline, from the carried sdist, for this GPU's compute capability alone.
    assert f"PIP_NO_INDEX=1 PIP_FIND_LINKS={carry}" in env and "HOROVOD_CUDA_CC_LIST=$cc" in env
    assert any(c.endswith("horovodrun --check-build") for c in commands)
    assert any("-m pytest tests/test_gpu.py" in c for c in commands)
    benches = [c for c in commands if "-m hvdbert.bench" in c]
    assert [(re.search(r"recipes/(\S+)\.toml", c).group(1), re.search(r"precision=(\w+)", c).group(1))
            for c in benches] == [("bert-large-phase1", "bf16"), ("bert-large-phase1", "fp16"),
                                  ("bert-large-phase2", "bf16"), ("bert-large-phase2", "fp16")]
    assert all("--workers 1 " in c for c in benches)
    assert commands[-1].endswith(f"tools/gpu_check_report.py {tmp_path / 'out'}")


@pytest.mark.parametrize("leave_out, expected", [
    ("horovod-{horovod}.tar.gz", "holds no horovod-"),
    ("torch_optimi-0.3.3-py3-none-any.whl", "holds no wheel of torch-optimi"),
])
def test_dry_run_refuses_missing_inputs_in_one_line(tmp_path, leave_out, expected):
    result = gpu_check("--dry-run", str(carry_dir(tmp_path, leave_out)), tmp_path=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and expected in result.stderr, result.stderr
    assert "--prepare" in result.stderr and result.stdout == ""


def test_dry_run_refuses_more_than_64_mib_to_carry(tmp_path):
    carry = carry_dir(tmp_path)
    with open(carry / "extra.whl", "wb") as big:
        big.write(b"\0" * (64 * 1024 * 1024 + 1))
    result = gpu_check("--dry-run", str(carry), tmp_path=tmp_path)
    assert result.returncode == 2 and "more than 64 MiB" in result.stderr, result.stderr


def test_run_without_a_gpu_stops_before_building(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = gpu_check(str(carry_dir(tmp_path)), tmp_path=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "nvidia-smi" in result.stderr or "sees no GPU" in result.stderr
    assert not (tmp_path / "out").exists()
