"""The chunk-size benchmark: every workload timed at every chunk size, with its provenance; the chunk it sets is the
one the passes take, and the constant is restored."""

from __future__ import annotations

import json

import pytest
import torch

import common.models as models
from common.models import build_model, in_chunks
from simulations.benchmarks.chunk_sizes import WORKLOADS, chunk_of, main, parse_chunks


def test_a_small_run_times_every_workload_at_every_chunk_size(tmp_path):
    out = tmp_path / "chunks.json"
    before = models.CPU_CHUNK
    assert main(["--small", "--modes", "fp32", "--chunks", "2,whole", "--iters", "1", "--warmup", "1",
                 "--json", str(out)]) == 0
    assert models.CPU_CHUNK == before
    record = json.loads(out.read_text())
    assert {"command", "commit", "date", "device", "sizes", "rows"} <= set(record)
    assert [(r["workload"], r["mode"], r["chunk"]) for r in record["rows"]] == [
        (w, "fp32", chunk) for w in WORKLOADS for chunk in (2, "whole")]
    assert all(r["ms"] > 0 for r in record["rows"])
    assert all(r["speedup_vs_whole"] == pytest.approx(1.0) for r in record["rows"] if r["chunk"] == "whole")


def test_the_chunk_set_is_the_one_the_passes_take():
    net, x = build_model(3, 3, 8, 8), torch.randn(5, 3, 8, 8)
    calls: list[int] = []

    def embed(part: torch.Tensor) -> torch.Tensor:
        calls.append(part.shape[0])
        return net.embed(part)

    with chunk_of(2):
        assert models.cpu_chunk(net, x) == 2
        in_chunks(embed, x, models.cpu_chunk(net, x))
    with chunk_of(None):
        in_chunks(embed, x, models.cpu_chunk(net, x))
    assert calls == [2, 2, 1, 5]


def test_bad_chunks_and_modes_are_usage_errors(capsys):
    assert parse_chunks("10,whole") == [10, None]
    for argv in (["--chunks", "0,whole"], ["--chunks", "ten"], ["--modes", "fp16"], ["--workloads", "train"]):
        with pytest.raises(SystemExit):
            main(argv)
    assert "unknown fp16" in capsys.readouterr().err
