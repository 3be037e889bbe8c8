"""The iteration profile: per mode, the operators' time and the convolutions' share, with its provenance."""

from __future__ import annotations

import json

import pytest

from simulations.benchmarks.profile_distill import is_convolution, main


def test_a_small_profile_records_the_convolutions_share_and_the_top_operators(tmp_path):
    out = tmp_path / "profile.json"
    assert main(["--small", "--modes", "fp32", "--iters", "1", "--warmup", "1", "--top", "5", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert {"command", "commit", "date", "device"} <= set(record)
    (fp32,) = record["profiles"]
    assert fp32["mode"] == "fp32" and fp32["it_per_s"] > 0
    assert 0 < fp32["convolution_share"] < 1
    assert fp32["bound_outside_convolutions"] == pytest.approx(1 / fp32["convolution_share"])
    assert len(fp32["top_ops"]) == 5 and any(is_convolution(op["op"]) for op in fp32["top_ops"])
    times = [op["self_ms_per_it"] for op in fp32["top_ops"]]
    assert times == sorted(times, reverse=True)
    # ConvNet-3's three convolutions (3 -> 8 channels at 8x8, then 8 -> 8 at 4x4 and 2x2), each in fp32 and bf16
    assert [(row["input"][1:], row["dtype"]) for row in record["convolutions"]] == [
        (shape, dtype) for shape in ([3, 8, 8], [8, 4, 4], [8, 2, 2]) for dtype in ("float32", "bfloat16")]
    assert all(row["conv_gflops"] > 0 and row["matmul_gflops"] > 0 for row in record["convolutions"])


def test_an_unknown_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["--modes", "fp16"])
    assert "unknown fp16" in capsys.readouterr().err
