"""The iteration profile: per mode, the operators' time and the convolutions' share, with its provenance."""

from __future__ import annotations

import json

import pytest

from simulations.benchmarks.profile_distill import is_convolution, is_double_backward_weight_term, main


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
    # The DKKT term's double backward runs the unwanted weight term on layers 2 and 3 (width 8 at 4x4 and 2x2, the
    # 6 candidates as channels), and its share is theirs
    by_shape = fp32["convolutions_by_shape"]
    assert all(is_convolution(row["op"]) for row in by_shape)
    terms = [row for row in by_shape if row["weight_term"]]
    assert terms and {tuple(map(tuple, row["input_shapes"])) for row in terms} <= {((8, 6, 4, 4), (8, 6, 4, 4)),
                                                                          ((8, 6, 2, 2), (8, 6, 2, 2))}
    assert fp32["weight_term_of_convolutions"] == pytest.approx(
        sum(row["self_ms"] for row in terms) / sum(row["self_ms"] for row in by_shape))
    assert 0 < fp32["weight_term_share"] == pytest.approx(fp32["weight_term_of_convolutions"] * fp32["convolution_share"])
    # ConvNet-3's three convolutions (3 -> 8 channels at 8x8, then 8 -> 8 at 4x4 and 2x2), each in fp32 and bf16
    assert [(row["input"][1:], row["dtype"]) for row in record["convolutions"]] == [
        (shape, dtype) for shape in ([3, 8, 8], [8, 4, 4], [8, 2, 2]) for dtype in ("float32", "bfloat16")]
    assert all(row["conv_gflops"] > 0 and row["matmul_gflops"] > 0 for row in record["convolutions"])


def test_an_unknown_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["--modes", "fp16"])
    assert "unknown fp16" in capsys.readouterr().err


def test_the_weight_term_is_told_from_the_layers_own_convolutions_by_its_shapes():
    """At ConvNet-3's width 128, 16x16, a chunk of 20: conv(ggI, gO) swaps images and channels; the forward
    convolution has a 3x3 weight; the first-order backward's (grad, input) shapes match but it is not a forward."""
    assert is_double_backward_weight_term("aten::mkldnn_convolution", [[128, 20, 16, 16], [128, 20, 16, 16]])
    assert not is_double_backward_weight_term("aten::mkldnn_convolution", [[20, 128, 16, 16], [128, 128, 3, 3]])
    assert not is_double_backward_weight_term("aten::convolution_backward", [[20, 128, 16, 16], [20, 128, 16, 16]])
    assert not is_double_backward_weight_term("aten::add", [[20, 128, 16, 16], [20, 128, 16, 16]])
