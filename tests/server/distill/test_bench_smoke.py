import json

from simulations.benchmarks import bench_distill


def test_bench_distill_small_runs_and_prints_the_ratios(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_distill.main(["--small", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for ratio in ("ours / reference", "ours / ours on whole batches",
                  "DKKT stationarity, ipc 2 (6 images): default / whole batch",
                  "evaluation: one net, default / whole batches", "estimate"):
        assert ratio in printed
    result = json.loads(out.read_text())
    assert result["command"] == f"python -m simulations.bench_distill --small --device cpu --json {out}"
    assert result["commit"] and result["date"]  # every committed figure says which code made it, and when
    assert result["ratios"] and all(v is not None and v > 0 for v in result["ratios"].values())
    assert result["estimate"]["total_s"] > 0
    sections = {r["section"].split(",")[0] for r in result["rows"]}
    assert {"DM step ipc 2", "DKKT stationarity", "evaluation ipc 2", "DM+DKKT iteration (methods.distill)"} <= sections
    variants = {r["variant"] for r in result["rows"]}  # every "before" row beside its "after" row
    assert {"ours, whole batch (no CPU chunks)", "batched, whole batch (no CPU chunks)", "batched (default path)"} <= variants
    assert any(v.startswith("ipc 2, nn.AvgPool2d") for v in variants) and "ipc 2" in variants


def test_bench_distill_times_the_channels_last_dm_step_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_distill.main(["--small", "--device", "cpu", "--sections", "dm", "--dm-pools", "pipc",
                               "--variants", "channels_last", "--json", str(out)]) == 0
    rows = {r["variant"]: r for r in json.loads(out.read_text())["rows"]}
    row = rows["ours + channels_last"]
    assert row["rate"] > 0, row
    assert float(row["note"].split("loss rel. diff ")[1]) < 1e-5  # the same loss, another memory layout
