"""Seeding, device selection, and the torch.compile and bfloat16 autocast switches: the one place for each."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
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
        raise ConfigError("device=cuda: this machine has no CUDA device (torch.cuda.is_available() is False); "
                          "use device=auto or cpu")
    return torch.device(preference)


def require_compiler(device: torch.device, key: str) -> None:
    """A ConfigError naming the config `key` where torch.compile cannot run: a CPU without a C++ compiler for inductor."""
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "clang++", "c++")):
        raise ConfigError(f"{key}=true: torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH and none "
                          f"was found; install one or set {key}=false")


def isolate_compile_cache() -> None:
    """Compiled code in a cache directory of its own when ATEN_CPU_CAPABILITY is set and no directory is chosen
    (TORCHINDUCTOR_CACHE_DIR): inductor generates CPU code for that vector ISA but does not key its cache on it. On
    torch 2.14.1 (2026-12-06, docs/benchmarks.md) code cached under `avx2` aborted an AVX-512 run with heap corruption,
    and code cached without the variable gave NaN under `avx2`."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{default_cache_dir()}-{capability.lower()}"


# At import, before anything imports torch._dynamo: its import fixes the cache directory for the process.
isolate_compile_cache()


def compiled(fn: Callable[..., torch.Tensor], enabled: bool, device: torch.device, key: str) -> Callable[..., torch.Tensor]:
    """`fn` itself, or (enabled: the config `key` is on) `torch.compile(fn)` at fixed shapes; a ConfigError naming
    `key` where it cannot run (`require_compiler`)."""
    if not enabled:
        return fn
    require_compiler(device, key)
    return torch.compile(fn, dynamic=False)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo, read once per process; empty where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


CPU_BF16_UNITS = ("avx512_bf16", "amx_bf16")  # bf16 arithmetic in hardware (AVX-512 BF16: AMD Zen 4+; AMX: Intel)


def resolve_precision(device: torch.device, precision: str) -> str:
    """'fp32' or 'bf16': `precision` itself, or for 'auto' bf16 on a CPU with bf16 units (CPU_BF16_UNITS), where
    bf16 distillation is the faster mode and its accuracy held (docs/benchmarks.md, "Distillation modes"), and
    fp32 elsewhere (a CPU without them, where bf16 is emulated and many times slower; a GPU, where it is unmeasured)."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and cpu_flags() & set(CPU_BF16_UNITS) else "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bfloat16 autocast for precision 'bf16' (weights and images stay fp32), nothing for 'fp32'; 'auto' is
    resolved first (resolve_precision)."""
    if resolve_precision(device, precision) == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


# Environment variables that cap the vector ISA ATen, inductor, oneDNN and MKL use: set, they make a CPU run the code
# paths of a lesser one (e.g. AVX2 on an AVX-512 machine), so a record names them.
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def describe_machine(device: torch.device) -> str:
    """The machine a figure was measured on: the GPU's name, or the CPU's model, its vector units (torch's CPU
    capability and any bf16 units: two CPUs of one model name can differ there), core count and torch threads, and
    any ISA limit set in the environment (ISA_LIMITS)."""
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    bf16 = [flag for flag in CPU_BF16_UNITS if flag in cpu_flags()]
    units = f"{torch.backends.cpu.get_cpu_capability()}, {' + '.join(bf16) if bf16 else 'no bf16 units'}"
    limits = [f"{key}={os.environ[key]}" for key in ISA_LIMITS if os.environ.get(key)]
    return (f"CPU: {len(names) or 'unknown number of'} cores ({names[0] if names else platform.machine()}; {units}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
            + (f"; ISA limited by {', '.join(limits)}" if limits else ""))


def utc_stamp() -> str:
    """Now, as the date every result record carries: "YYYY-MM-DD HH:MM UTC"."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def git_commit() -> str:
    """The short commit of this checkout, with "-dirty" when a tracked file outside docs/ differs from it (the code
    that ran is then not that commit's); "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(exclude,top)docs"],
                                 capture_output=True, text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if changed else commit
