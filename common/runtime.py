"""Seeding and device selection: the one place for both."""

from __future__ import annotations

import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from common.config import ConfigError


class FederationError(RuntimeError):
    """A federated run that cannot go on (a round with too few usable replies); the message is one line naming
    the nodes and their reasons."""


def seed_everything(seed: int) -> torch.Generator:
    """Seeds python, numpy and torch (CPU and CUDA); returns a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(preference: str = "auto") -> torch.device:
    """`auto`: CUDA when available, else CPU. `cuda` without a GPU is a ConfigError, not a silent fallback."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda: this machine has no CUDA device (torch.cuda.is_available() is False); use device=auto or cpu")
    return torch.device(preference)


def describe_machine(device: torch.device) -> str:
    """The machine a figure was measured on: the GPU's name, or the CPU's model, core count and torch threads."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return (f"CPU: {len(names) or 'unknown number of'} cores ({names[0] if names else platform.machine()}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def git_commit() -> str:
    """The short commit of this checkout ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()
