"""The report: Table-1 layout with mean +- std, the pipc plot, Figures 2 and 3 from saved synthetic sets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.axes import Axes
from PIL import Image

from common.atomic import save_json
from common.config import config_to_dict, load_config
from common.data import CIFAR10_NORMALIZATION, Normalization
from server.distill.artifacts import load_synthetic, save_synthetic
from server.distill.methods import SyntheticSet
from simulations.grid.sweep import write_results
from simulations.reports.report import fft_magnitude, markdown_table, render

CONFIG = config_to_dict(load_config("quickstart"))


def _fake_sweep(root, grid, normalization=CIFAR10_NORMALIZATION):
    """Finished cells with saved synthetic sets and result.json, as run_sweep leaves them."""
    channels = normalization.channels
    for pipc, ipc, method, seed, accs in grid:
        name = f"pipc{pipc}-ipc{ipc}-{method.replace('+', '_')}-seed{seed}"
        cell = root / "cells" / name
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(3 * ipc, channels, 8, 8, generator=g)
        syn = SyntheticSet(images, torch.arange(3).repeat_interleave(ipc), None, method, seed)
        save_synthetic(syn, cell / "seed_0", normalization)
        save_json(cell / "cell.json", {"cell": name, "pipc": pipc, "ipc": ipc, "method": method, "seed": seed})
        save_json(cell / "result.json", {"accuracies": accs, "mean": float(np.mean(accs)), "std": float(np.std(accs)),
                                         "config": CONFIG, "commit": "abc1234",
                                         "timings": {"distill_s": 1.0, "evaluate_s": 1.0}})
    return write_results(root)


def test_table_pools_seeds_and_marks_the_best(tmp_path):
    results = _fake_sweep(tmp_path, [
        (50, 1, "dm", 0, [0.20, 0.22]), (50, 1, "dm", 1, [0.24, 0.26]),
        (50, 1, "dm+dkkt", 0, [0.30, 0.30]), (10, 1, "random", 0, [0.15]), (10, 1, "dm", 0, [0.19]),
    ])
    table = markdown_table(results)
    assert "| ipc | pipc | random | dm | dm+dkkt |" in table
    assert "| 1 | 50 | - | 23.0 ± 2.2 | **30.0 ± 0.0** |" in table  # dm pools 4 evaluations of 2 seeds; no random here
    assert "| 1 | 10 | 15.0 ± 0.0 | **19.0 ± 0.0** (+4.0) | - |" in table  # IOR = accuracy - random


def test_render_writes_every_figure(tmp_path):
    _fake_sweep(tmp_path, [(10, 1, "dm", 0, [0.2]), (50, 1, "dm", 0, [0.25]), (50, 1, "dm+dkkt", 0, [0.3]),
                           (50, 2, "dm", 0, [0.35]), (50, 2, "dm+dkkt", 0, [0.4])])
    written = render(tmp_path)
    assert set(written) == {"table", "plot", "figure2", "figure3"}
    assert "Protocol: 20 distillation iterations, 50 evaluation epochs, 2 nets per seed, seeds 0; commit abc1234." in (
        written["table"].read_text())
    for key in ("plot", "figure2", "figure3"):
        with Image.open(written[key]) as img:
            assert img.size[0] > 100 and img.size[1] > 50


def test_figures_show_grey_sets_in_grey_with_their_own_normalisation(tmp_path, monkeypatch):
    grey = Normalization((0.3,), (0.2,))
    _fake_sweep(tmp_path, [(50, 1, "dm", 0, [0.2]), (50, 1, "dm+dkkt", 0, [0.3])], grey)
    shown = []
    monkeypatch.setattr(Axes, "imshow", lambda ax, image, **kw: shown.append((np.asarray(image), kw)))
    render(tmp_path)
    pictures = [(image, kw) for image, kw in shown if kw.get("cmap") != "magma"]  # figure 2, figure 3's means
    assert pictures and all(image.ndim == 2 and kw["cmap"] == "gray" for image, kw in pictures)
    syn = load_synthetic(tmp_path / "cells" / "pipc50-ipc1-dm_dkkt-seed0" / "seed_0")
    expected = (syn.images[0, 0] * 0.2 + 0.3).clamp(0, 1).numpy()  # denormalised with the set's own statistics
    np.testing.assert_allclose(pictures[0][0], expected, atol=1e-6)


def test_fft_magnitude_finds_a_stripe_frequency():
    x = np.arange(32)
    stripes = np.repeat(np.sin(2 * np.pi * 4 * x / 32)[None, :, None], 32, axis=0).repeat(3, axis=2)
    spectrum = fft_magnitude(stripes)
    peak = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    assert peak[0] == 16 and abs(peak[1] - 16) == 4  # centred zero frequency, 4 cycles along x


def test_report_without_results_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `feddistill sweep` first"):
        render(tmp_path)


def test_results_csv_keeps_every_evaluation(tmp_path):
    results = _fake_sweep(tmp_path, [(10, 1, "dm", 0, [0.1, 0.3])])
    on_disk = pd.read_csv(tmp_path / "results.csv")
    assert json.loads(on_disk.loc[0, "accuracies"]) == [0.1, 0.3]
    assert on_disk.loc[0, "num_evaluations"] == 2 and results.loc[0, "accuracy_mean"] == pytest.approx(0.2)


def test_a_run_folder_gets_its_round_curve_and_each_methods_loss_and_share_curves(tmp_path):
    import json as _json

    from simulations.reports.report import render_run

    rounds = [{"round": r, "test_accuracy": 0.1 + 0.1 * r, "client_eval_accuracy": None if r == 0 else 0.15 + 0.1 * r}
              for r in range(4)]
    (tmp_path / "metrics.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rounds))
    history = tmp_path / "distill" / "dm_dkkt" / "seed_0" / "history.jsonl"
    history.parent.mkdir(parents=True)
    lines = [{"iteration": i, "dm": 100.0 / i, "dkkt": 0.1, "stat": 0.02, "primal": 0.0, "share_dkkt": 0.3,
              "stat_rel": 0.99, "lambda_mean": 0.01 * i, "seconds": float(i)} for i in range(1, 6)]
    history.write_text("".join(_json.dumps(x) + "\n" for x in lines))
    written = render_run(tmp_path)
    assert set(written) == {"rounds", "history dm_dkkt"}
    for path in written.values():
        with Image.open(path) as img:
            assert img.size[0] > 100


def _audit_row(name, method, pipc, fraction, low, high, planted=None, planted_flagged=None):
    row = {"set": name, "method": method, "ipc": 10, "pipc": pipc, "seed": 0, "images": 100,
           "planted": planted, "planted_flagged": planted_flagged}
    for space in ("pixel", "feature"):
        row |= {f"{space}_fraction": fraction, f"{space}_fraction_low": low, f"{space}_fraction_high": high,
                f"{space}_null_fraction": 0.5, f"{space}_auc": 0.5}
    return row


def test_audit_table_counts_sets_whose_interval_excludes_the_null_and_the_planted_control():
    from simulations.reports.report import audit_table

    summary = pd.DataFrame([
        _audit_row("pipc10-ipc10-dm_dkkt-seed0", "dm+dkkt", 10, 0.52, 0.45, 0.60),
        _audit_row("pipc10-ipc10-dm_dkkt-seed1", "dm+dkkt", 10, 0.70, 0.62, 0.78),  # beyond the null
        _audit_row("pipc10-ipc10-dm_dkkt-seed0+planted5", "dm+dkkt", 10, 0.6, 0.5, 0.7, planted=10, planted_flagged=9),
    ])
    table = audit_table(summary)
    row = next(line for line in table.splitlines() if line.startswith("| 10 | 10 | dm+dkkt"))
    assert row.split("|")[4].strip() == "2"  # two plain sets; the planted control is not one of them
    assert row.rstrip(" |").endswith("1")  # one set beyond the null
    assert "0.61 [0.45, 0.78] (0.50)" in row
    assert "9 of 10 planted images flagged" in table
    assert audit_table(summary[summary["set"].str.contains("planted")]) is None


def test_traffic_table_states_where_the_bytes_come_from():
    from simulations.reports.report import traffic_table

    table = traffic_table((153_600_000, "computed"), {10: {"stored": 1_229_600, "uint8": 307_300}})
    assert "| 10 | 153.6 MB | 1229.6 kB | 307.3 kB |" in table and "Bytes received: computed." in table
    assert "not recorded" in traffic_table((None, "no metrics"), {1: {"stored": 1, "uint8": 1}})


def test_each_variant_of_dm_dkkt_gets_its_paired_gains():
    from simulations.grid.report import gain_tables

    rows = [(method, seed, acc) for seed in (0, 1) for method, acc in
            (("random", 0.2), ("dm", 0.3), ("dm@conv", 0.31), ("dm+dkkt", 0.35), ("dm+dkkt@lambda", 0.37 + 0.01 * seed),
             ("dm+primal", 0.33))]
    results = pd.DataFrame([{"ipc": 10, "pipc": 20, "method": m, "seed": s, "accuracies": json.dumps([a, a])}
                            for m, s, a in rows])
    base, start, ablation = gain_tables(results)
    assert "| 10 | 20 | 33.0 | -2.0 ± 0.0 (0/2) | +3.0 ± 0.0 (2/2) | +2.0 ± 0.0 (2/2) |" in ablation
    assert "| 10 | 20 | 35.0 | +15.0 ± 0.0 (2/2) | +5.0 ± 0.0 (2/2) |" in base
    assert "| ipc | pipc | dm+dkkt@lambda | − dm+dkkt | − dm |" in start
    assert "| 10 | 20 | 37.5 | +2.5 ± 0.5 (2/2) | +7.5 ± 0.5 (2/2) |" in start


def test_timing_section_counts_cpu_hours_by_each_cells_threads():
    from simulations.grid.report import timing_section

    machine = "CPU: 2 cores (AMD EPYC), {} torch threads, torch 2.14.1"
    results = pd.DataFrame([
        {"ipc": 1, "pipc": 10, "method": "dm", "seed": 0, "distill_s": 1800.0, "evaluate_s": 1800.0,
         "machine": machine.format(2)},
        {"ipc": 1, "pipc": 10, "method": "dm", "seed": 1, "distill_s": 900.0, "evaluate_s": 900.0,
         "machine": machine.format(1)},
        {"ipc": 1, "pipc": 10, "method": "random", "seed": 0, "distill_s": float("nan"), "evaluate_s": 3600.0,
         "machine": None},
    ])
    text = timing_section(results)
    assert "3 cells, 2.5 hours of cell time, 3.5 CPU-hours" in text
    assert "counted as 1 for the 1 cells" in text and "CPU-hours per method: dm 2.5, random 1.0." in text
    assert "| 1 | 10 | dm | 2 | 1350 | 1350 |" in text


def test_the_protocol_header_says_how_the_cells_distilled(tmp_path):
    """Reused eager cells beside compiled ones: the header counts them, where the preset alone would say compiled."""
    from simulations.grid.protocol import base_config, load_protocol
    from simulations.grid.report import protocol_header

    protocol = load_protocol("split-ratio-cpu")
    cfg = base_config(protocol, {})
    edge = {"num_clients": 5, "rounds": 3, "test_accuracy": 0.5}
    results = []
    for i, compile_ in enumerate([True, False, False]):
        cell = tmp_path / f"cell{i}"
        config = {**CONFIG, "distill": {**CONFIG["distill"], "compile": compile_}}
        save_json(cell / "cell.json", {"cell": cell.name})
        save_json(cell / "result.json", {"config": config, "commit": "abc1234", "distill_precision": "bf16"})
        results.append(cell / "result.json")
    assert cfg.distill.compile
    assert "cells ran in bf16), compiled in 1 of 3 cells, eager in the rest, evaluation in fp32, eager" in (
        protocol_header(protocol, "split-ratio-cpu", cfg, edge, 0.3, results))
    assert "bf16), compiled, evaluation" in protocol_header(protocol, "split-ratio-cpu", cfg, edge, 0.3, results[:1])
    assert "bf16), eager, evaluation" in protocol_header(protocol, "split-ratio-cpu", cfg, edge, 0.3, results[1:])
