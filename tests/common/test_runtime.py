"""`common.runtime.describe_machine`: the record names what the figure ran on, vector units included."""

from pathlib import Path

import pytest
import torch

from common.runtime import ISA_LIMITS, describe_machine


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
