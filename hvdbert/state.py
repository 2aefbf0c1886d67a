"""What a training run carries from step to step besides the model and optimizer: its progress
counters (`TrainState`) and its precision (`Precision`: autocast and the fp16 loss scaler).

Both are plain state: the run assembles them, the loop updates them, checkpoints save them and the
evaluation borrows the autocast. They live below all of those so that none imports the loop for them.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from hvdbert.data.loader import StreamLayout


@dataclass
class TrainState:
    """Progress counters; they travel with the model state in checkpoints."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global sample position: the data stream resumes from here

    def state_dict(self) -> dict:
        return {"step": self.step, "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])

    def advance(self, layout: StreamLayout) -> None:
        """One optimizer step done: the data stream moved on by the same global batch."""
        self.step += 1
        self.samples_seen += layout.global_batch_size


@dataclass
class Precision:
    """Autocast and loss scaling for train.precision."""

    name: str
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    skipped_steps: int = 0  # fp16: steps the GradScaler skipped for inf/NaN gradients

    @classmethod
    def create(cls, name: str, device: torch.device) -> "Precision":
        # fp16's narrow exponent range needs loss scaling; torch has a GradScaler for CUDA and for CPU.
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name, device, scaler)

    @staticmethod
    def supported(name: str, device_type: str) -> bool:
        """Whether this torch runs `name` on `device_type`: autocast in that dtype (older torch
        disables CPU autocast for float16 with a warning instead of failing) and, for fp16, a
        GradScaler for the device."""
        if name == "fp32":
            return True
        dtype = torch.bfloat16 if name == "bf16" else torch.float16
        try:
            if not torch.amp.is_autocast_available(device_type):
                return False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.autocast(device_type=device_type, dtype=dtype):
                    enabled = (torch.is_autocast_enabled(device_type)
                               and torch.get_autocast_dtype(device_type) == dtype)
        except AttributeError:  # a torch older than these queries (2.4): CPU autocast had bf16 only
            return name == "bf16" and device_type == "cpu"
        if not enabled or name != "fp16":
            return enabled
        try:
            torch.amp.GradScaler(device_type)
        except (RuntimeError, ValueError, TypeError):
            return False
        return True

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)
