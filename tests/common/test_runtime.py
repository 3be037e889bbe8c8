"""`common.runtime.describe_machine`: the record names what the figure ran on, vector units included."""

import os
from pathlib import Path

import pytest
import torch

from common.runtime import ISA_LIMITS, describe_machine, isolate_compile_cache


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs /proc/cpuinfo")
def test_cpu_record_names_the_vector_units_and_any_bf16_units() -> None:
    """Two CPUs sold as "AMD EPYC" can be a Zen 3 (AVX2, no bf16) or a Zen 4 (AVX-512 BF16): the record tells."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    record = describe_machine(torch.device("cpu"))
    assert torch.backends.cpu.get_cpu_capability() in record
    for flag in ("avx512_bf16", "amx_bf16"):
        assert (flag in record) == (flag in flags)
    assert ("no bf16 units" in record) == (not {"avx512_bf16", "amx_bf16"} & set(flags))
    assert f"{torch.get_num_threads()} torch threads" in record


def test_cpu_record_names_an_isa_limit_set_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run told to use AVX2 code paths on an AVX-512 machine says so; without the variables nothing is added."""
    for key in ISA_LIMITS:
        monkeypatch.delenv(key, raising=False)
    assert "ISA limited" not in describe_machine(torch.device("cpu"))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    assert describe_machine(torch.device("cpu")).endswith(
        "; ISA limited by ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2")


def test_compiled_code_under_an_isa_limit_gets_a_cache_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor's cache does not key on ATEN_CPU_CAPABILITY: under the variable the guard (run when common.runtime is
    imported) picks a directory of its own; a directory the user chose is kept, and without the variable nothing is
    set."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    isolate_compile_cache()
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    isolate_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == f"{default_cache_dir()}-avx2"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/chosen")
    isolate_compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/chosen"


def test_a_process_under_an_isa_limit_compiles_into_its_own_cache(tmp_path) -> None:
    """End to end, in a fresh process: importing the project under ATEN_CPU_CAPABILITY=avx2, then the first use of
    torch._dynamo (which fixes the cache directory for the process), leaves the isolated directory in place."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"} | {"ATEN_CPU_CAPABILITY": "avx2"}
    code = ("import os, common.runtime, torch; torch._dynamo.reset(); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout
    assert out.strip().endswith("-avx2")
