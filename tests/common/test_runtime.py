"""`common.runtime.describe_machine`: the record names what the figure ran on, vector units included."""

from pathlib import Path

import pytest
import torch

from common.runtime import describe_machine


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
