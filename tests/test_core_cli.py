"""pretrain's bad-input handling and precision paths, as one plain process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, REPO, TINY, run_module


@pytest.mark.parametrize("extra, expected", [
    (["--set", "train.max_step=3"], "unknown key train.max_step; did you mean train.max_steps?"),
    (["--set", "optim.lr=fast"], "optim.lr = 'fast' has the wrong type; expected a number"),
    (["--set", "data.max_seq_len=256"], "data.max_seq_len = 256 exceeds model.max_position_embeddings = 128"),
    (["--recipe", "missing.toml"], "recipe file not found"),
    (["--data", "/nonexistent/data"], "data directory not found: /nonexistent/data"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, cli, extra, expected):
    run_dir = tmp_path / "run"
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", run_dir, *FAST, *extra])
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_a_refusal_as_a_real_process_is_one_line_exit_2(tmp_path, hvdbert_env):
    # The other refusals run in-process (the `cli` fixture); this one shows the command's own process
    # ends the same way: exit status 2, one line, no traceback, nothing written.
    result = run_module("hvdbert.pretrain", ["--recipe", str(TINY), "--output", str(tmp_path / "run"), *FAST,
                                             "--set", "train.max_step=3"], hvdbert_env, check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("hvdbert.pretrain: error: --set train.max_step=3: unknown key train.max_step; "
                               "did you mean train.max_steps?")
    assert not (tmp_path / "run").exists()


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, cli):
    # the test captures stderr, as horovodrun and mpirun pipe it for their workers
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", tmp_path / "run", *FAST,
                                      "--set", "train.progress_bar=true", "--set", "train.max_steps=4",
                                      "--set", "train.log_every=2"])
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith("hvdbert: step ")]
    assert [line.split()[2] for line in progress] == ["2/4", "4/4"], result.stderr
    assert all(" loss " in line and " seq/s" in line for line in progress)
    assert "\r" not in result.stderr and "it/s" not in result.stderr and "step/s" not in result.stderr


@pytest.mark.parametrize("extra, expected", [
    (["--set", "optim.lr=nan"], "--set optim.lr=nan: optim.lr = nan is not a finite number"),
    (["--set", "optim.lr=inf"], "--set optim.lr=inf: optim.lr = inf is not a finite number"),
    (["--set", "model.num_hidden_layers=-1"], "model.num_hidden_layers = -1 must be an integer greater than 0"),
    (["--set", "model.hidden_size=100", "--set", "model.num_attention_heads=3"],
     "--set model.num_attention_heads=3: model.hidden_size = 100 is not a multiple of model.num_attention_heads"),
    (["--set", 'model.hidden_act="nope"'], "model.hidden_act = 'nope' is not valid; choose one of gelu,"),
    (["--set", "train.max_steps=abc"], "--set train.max_steps=abc: train.max_steps = 'abc' has the wrong type"),
    (["--output", "/proc/hvdbert-run"], "--output /proc/hvdbert-run: cannot write in /proc"),
])
def test_more_bad_input_is_one_line_exit_2(tmp_path, cli, extra, expected):
    run_dir = tmp_path / "run"
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", run_dir, *FAST, *extra])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvdbert.pretrain: error: ") and expected in lines[0], lines
    assert not run_dir.exists()


def test_an_output_that_is_a_file_or_a_recipe_that_is_not_utf8_is_one_line(tmp_path, cli):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me\n")
    result = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", a_file, *FAST])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"hvdbert.pretrain: error: --output {a_file} is a file, not a directory; choose a directory"]
    assert a_file.read_text() == "keep me\n"
    recipe = tmp_path / "latin1.toml"
    recipe.write_bytes(TINY.read_bytes() + "# caf\u00e9\n".encode("latin-1"))
    result = cli("hvdbert.pretrain", ["--recipe", recipe, "--output", tmp_path / "run", *FAST])
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "not UTF-8 text (byte 0xe9" in lines[0], lines


def in_private_mount(command: list[str], mount_options: str, target: Path) -> list[str]:
    """`command` in a private mount namespace where `mount MOUNT_OPTIONS target` has been done: the
    mount is seen by that process only, and gone with it."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare to mount a read-only or full filesystem for one process")
    script = f'mount {mount_options} "$0" && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, str(target), *command]


def test_read_only_output_is_one_line(tmp_path, hvdbert_env):
    target = tmp_path / "mount"
    target.mkdir()
    command = in_private_mount([sys.executable, "-m", "hvdbert.pretrain", "--recipe", str(TINY), "--output",
                                str(target / "run"), *FAST], '--bind -o ro "$0"', target)
    result = subprocess.run(command, cwd=REPO, env=hvdbert_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"hvdbert.pretrain: error: --output {target / 'run'}: cannot write in {target} (Read-only file system); "
        "choose a location you can write"]


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_run(tmp_path, hvdbert_env):
    # 3 MB: room for metrics and the first checkpoint of a tiny model (about 1.2 MB with the optimizer
    # state), not for two
    target = tmp_path / "small-disk"
    target.mkdir()
    run_dir = target / "run"
    command = in_private_mount([sys.executable, "-m", "hvdbert.pretrain", "--recipe", str(TINY), "--output",
                                str(run_dir), *FAST, "--set", "train.max_steps=4", "--set",
                                "checkpoint.every_steps=2", "--set", "checkpoint.keep=5", "--set",
                                "train.log_every=1", "--set", "model.num_hidden_layers=1"],
                               '-t tmpfs -o size=3m tmpfs', target)
    result = subprocess.run(command, cwd=REPO, env=hvdbert_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("hvdbert.pretrain: error: ") and "No space left on device" in line, line
    assert "Traceback" not in result.stderr


def test_precision_support_is_asked_of_the_installed_torch():
    """pretrain refuses a precision this torch cannot run on the CPU (one line, exit 2; choose_device)
    and runs the others: torch 2.13's CPU autocast has float16 and bfloat16, and a CPU GradScaler."""
    import torch

    from hvdbert.state import Precision

    assert Precision.supported("fp32", "cpu")
    assert Precision.supported("bf16", "cpu") and Precision.supported("fp16", "cpu")
    assert isinstance(Precision.create("fp16", torch.device("cpu")).scaler, torch.amp.GradScaler)
    # A device type without autocast gets the refusal.
    assert not Precision.supported("bf16", "meta") and not Precision.supported("fp16", "meta")


def test_a_ctrl_c_in_hvd_init_is_one_line_and_exit_130(tmp_path, cli, monkeypatch):
    from hvdbert import pretrain

    def interrupted(cfg):
        raise KeyboardInterrupt  # what a Ctrl-C raises when hvd.init returns to Python

    monkeypatch.setattr(pretrain, "init_distributed", interrupted)
    status, err = cli("hvdbert.pretrain", ["--recipe", TINY, "--output", tmp_path / "run"]).exit_and_stderr_lines()
    assert (status, err) == (130, ["hvdbert.pretrain: interrupted (SIGINT)"])
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_while_torch_imports_is_one_line_and_exit_130(tmp_path, hvdbert_env):
    """A real process: the interrupt arrives inside `import torch` (-X importtime reports its submodules
    as they finish), before any of pretrain's code runs."""
    import signal

    def interruptible() -> None:
        """In the child, before exec: SIGINT as a terminal's program gets it. A process inherits an
        ignored or blocked SIGINT (a shell's background job ignores it, some libraries block it), and
        then Python never raises KeyboardInterrupt: seen in a full clean-clone run, which trained on."""
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    child = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "hvdbert.pretrain", "--recipe", str(TINY),
                              "--output", str(tmp_path / "run")], cwd=REPO, env=hvdbert_env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=interruptible)
    for line in child.stderr:
        if line.split("|")[-1].strip().startswith("torch."):  # a submodule of torch done: torch is still importing
            child.send_signal(signal.SIGINT)
            break
    rest = child.stderr.read()
    assert child.wait(timeout=60) == 130, rest[-3000:]
    said = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert said == ["hvdbert.pretrain: interrupted (SIGINT)"], rest[-3000:]
    assert not (tmp_path / "run").exists()
