"""Renders a sweep folder: the Table-1-style Markdown table, accuracy vs pipc plots, and Figures 2 and 3.

    feddistill report SWEEP_DIR [--out DIR]

- `table.md`: mean +- std test accuracy (%) over seeds x evaluation nets; one row per (ipc, pipc), one
  column per method (the layout of the paper's Table 1: methods side by side per setting).
- `accuracy_vs_pipc.png`: accuracy against pipc, one panel per ipc, one line per method.
- `figure2.png`: the distilled images of one cell (ipc 1, pipc 50 by default), one column per class.
- `figure3.png`: per-class average of DSV-method images vs DM images, and their 2-D FFT magnitude spectra.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from common.atomic import atomic_write  # noqa: E402
from common.data import denormalize  # noqa: E402
from common.methods import METHODS  # noqa: E402
from server.distill.artifacts import load_synthetic, synthetic_normalization  # noqa: E402

METHOD_ORDER = list(METHODS)


def load_results(sweep_dir: Path) -> pd.DataFrame:
    path = Path(sweep_dir) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results yet; run `feddistill sweep` first")
    return pd.read_csv(path)


def pooled(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (%) per (ipc, pipc, method), pooling every evaluation of every seed."""
    rows = []
    for (ipc, pipc, method), group in results.groupby(["ipc", "pipc", "method"]):
        accs = np.concatenate([json.loads(a) for a in group["accuracies"]]) * 100
        rows.append({"ipc": ipc, "pipc": pipc, "method": method, "mean": accs.mean(), "std": accs.std(),
                     "seeds": len(group), "evaluations": len(accs)})
    return pd.DataFrame(rows)


def _methods(frame: pd.DataFrame) -> list[str]:
    present = set(frame["method"])
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def markdown_table(results: pd.DataFrame) -> str:
    stats = pooled(results)
    methods = _methods(stats)
    lines = ["| ipc | pipc | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for (ipc, pipc), group in stats.groupby(["ipc", "pipc"]):
        by_method = group.set_index("method")
        best = by_method["mean"].max()
        random = by_method.loc["random", "mean"] if "random" in by_method.index else None
        cells = []
        for m in methods:
            if m not in by_method.index:
                cells.append("-")
                continue
            row = by_method.loc[m]
            text = f"{row['mean']:.1f} ± {row['std']:.1f}"
            text = f"**{text}**" if row["mean"] == best and len(by_method) > 1 else text
            cells.append(text + (f" ({row['mean'] - random:+.1f})" if random is not None and m != "random" else ""))
        lines.append(f"| {ipc} | {pipc} | " + " | ".join(cells) + " |")
    n = stats[["seeds", "evaluations"]].max()
    lines.append("")
    lines.append(f"Test accuracy (%), mean ± std over up to {n['seeds']} distillation seeds × evaluation nets "
                 f"({n['evaluations']} evaluations per cell at most); best per row in bold; in brackets the gain over "
                 "`random` (a random real subset of the same size, same protocol: DD-Ranking's IOR), in points.")
    return "\n".join(lines) + "\n"


def _save_figure(fig: plt.Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight"))
    plt.close(fig)
    return path


def paired_gains(results: pd.DataFrame, method: str, baselines: tuple[str, ...]) -> str:
    """Markdown: per (ipc, pipc), `method`'s gain over each baseline in points, paired by distillation seed (the
    same evaluation nets): mean ± std of the per-seed differences, and in how many seeds `method` was ahead."""
    present = [b for b in baselines if b in set(results["method"])]
    per_seed = results.assign(acc=[100 * np.mean(json.loads(a)) for a in results["accuracies"]])
    lines = [f"| ipc | pipc | {method} | " + " | ".join(f"− {b}" for b in present) + " |",
             "|---|---|---|" + "---|" * len(present)]
    for (ipc, pipc), group in per_seed.groupby(["ipc", "pipc"]):
        ours = group[group["method"] == method].set_index("seed")["acc"]
        if ours.empty:
            continue
        cells = []
        for b in present:
            theirs = group[group["method"] == b].set_index("seed")["acc"]
            seeds = ours.index.intersection(theirs.index)
            if seeds.empty:
                cells.append("-")
                continue
            diff = ours[seeds] - theirs[seeds]
            cells.append(f"{diff.mean():+.1f} ± {diff.std(ddof=0):.1f} ({int((diff > 0).sum())}/{len(seeds)})")
        lines.append(f"| {ipc} | {pipc} | {ours.mean():.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nGain of `{method}` in points, paired by distillation seed (same evaluation nets): "
                               "mean ± std over seeds of the per-seed difference of mean accuracies; in brackets the "
                               "seeds in which it was ahead.\n")


def audit_table(summary: pd.DataFrame) -> str | None:
    """Markdown: the leakage audit's statistics per (ipc, pipc, method), from `feddistill audit`'s summary.csv rows
    (planted controls apart): in each space, the fraction of synthetic images whose nearest private image is closer
    than their nearest held-out one (mean over sets; the widest 95 % interval; the null), the membership AUC, and the
    sets whose interval excludes the null. None when no row is a plain set."""
    plain = summary[~summary["set"].str.contains("+planted", regex=False)]
    if plain.empty:
        return None
    lines = ["| ipc | pipc | method | sets | pixel: closer to private [95 % CI] (null) | pixel AUC | "
             "feature: closer to private [95 % CI] (null) | feature AUC | sets beyond the null |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (ipc, pipc, method), g in plain.groupby(["ipc", "pipc", "method"]):
        spaces, beyond = [], 0
        for space in ("pixel", "feature"):
            null = g[f"{space}_null_fraction"]
            outside = (null < g[f"{space}_fraction_low"]) | (null > g[f"{space}_fraction_high"])
            beyond = np.maximum(beyond, outside.to_numpy().astype(int))
            spaces += [f"{g[f'{space}_fraction'].mean():.2f} [{g[f'{space}_fraction_low'].min():.2f}, "
                       f"{g[f'{space}_fraction_high'].max():.2f}] ({g[f'{space}_null_fraction'].mean():.2f})",
                       f"{g[f'{space}_auc'].mean():.3f}"]
        lines.append(f"| {ipc} | {pipc} | {method} | {len(g)} | " + " | ".join(spaces) + f" | {int(np.sum(beyond))} |")
    planted = summary[summary["set"].str.contains("+planted", regex=False)]
    control = (f" Positive control (the same sets with private images planted): {int(planted['planted_flagged'].sum())} of "
               f"{int(planted['planted'].sum())} planted images flagged." if not planted.empty else "")
    return "\n".join(lines) + ("\n\nLeakage audit (`feddistill audit`, docs/audit.md): ~0.5 and an AUC ~0.5 when nothing "
                               "leaks; a set is beyond the null when its 95 % interval excludes the null fraction in "
                               "either space." + control + "\n")


def traffic_table(received: tuple[int | None, str], synthetic: dict[int, dict[str, int]]) -> str:
    """Markdown: bytes the server received from the edge (with where the figure comes from) beside the size of the
    synthetic set it made at each ipc (float32 as stored, and as 8-bit images)."""
    total, source = received
    got = f"{total / 1e6:.1f} MB" if total is not None else "not recorded"
    lines = ["| ipc | bytes received from the edge | synthetic set (float32) | synthetic set (uint8) |", "|---|---|---|---|"]
    lines += [f"| {ipc} | {got} | {size['stored'] / 1e3:.1f} kB | {size['uint8'] / 1e3:.1f} kB |"
              for ipc, size in sorted(synthetic.items())]
    return "\n".join(lines) + f"\n\nBytes received: {source}.\n"


def plot_accuracy_vs_pipc(results: pd.DataFrame, path: Path, reference: tuple[str, float] | None = None) -> Path:
    """Accuracy against pipc (log x), one panel per ipc, one line per method with ± std bars; `reference` (label,
    accuracy %) is drawn as a horizontal line (e.g. the received model's test accuracy)."""
    stats = pooled(results)
    ipcs = sorted(stats["ipc"].unique())
    fig, axes = plt.subplots(1, len(ipcs), figsize=(4.5 * len(ipcs), 3.6), squeeze=False)
    for ax, ipc in zip(axes[0], ipcs, strict=True):
        sub = stats[stats["ipc"] == ipc]
        for method in _methods(sub):
            line = sub[sub["method"] == method].sort_values("pipc")
            ax.errorbar(line["pipc"], line["mean"], yerr=line["std"], marker="o", capsize=3, label=method)
        if reference is not None:
            ax.axhline(reference[1], color="black", linestyle="--", linewidth=1, label=reference[0])
        ax.set_xscale("log")
        pipcs = sorted(sub["pipc"].unique())
        ax.set_xticks(pipcs, [str(p) for p in pipcs])
        ax.minorticks_off()
        ax.set_xlabel("public images per class (pipc)")
        ax.set_title(f"ipc = {ipc}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    return _save_figure(fig, path)


def _cell_dir(sweep_dir: Path, results: pd.DataFrame, method: str, ipc: int, pipc: int | None) -> Path:
    rows = results[(results["method"] == method) & (results["ipc"] == ipc)]
    if pipc is not None:
        rows = rows[rows["pipc"] == pipc]
    if rows.empty:
        raise ValueError(f"no finished cell with method={method} ipc={ipc}" + (f" pipc={pipc}" if pipc else ""))
    return set_dir(Path(sweep_dir) / "cells" / rows.sort_values(["pipc", "seed"]).iloc[-1]["cell"]) / "seed_0"


def set_dir(cell_dir: Path) -> Path:
    """Where a cell's seed folders with the synthetic set live: the cell itself, or the cell its results were reused
    from (cell.json `reused_from`, relative to the cell)."""
    info = cell_dir / "cell.json"
    reused = json.loads(info.read_text()).get("reused_from") if info.is_file() else None
    return set_dir((cell_dir / reused).resolve()) if reused else cell_dir  # a reused cell may itself be reused


def _images(cell_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The cell's synthetic images in [0, 1], (N, H, W, C) with the dataset's channels, and their labels."""
    syn = load_synthetic(cell_dir)
    return denormalize(syn.images, synthetic_normalization(cell_dir)).permute(0, 2, 3, 1).numpy(), syn.labels.numpy()


def _show(ax: plt.Axes, image: np.ndarray, cmap: str | None = None) -> None:
    """An (H, W, 3) colour or (H, W, 1) grey image in [0, 1] (grey drawn with a grey colormap), or an (H, W) map."""
    if image.ndim == 3 and image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image, cmap=cmap)


def figure2(sweep_dir: Path, results: pd.DataFrame, path: Path, method: str = "dm+dkkt", pipc: int | None = 50,
            class_names: list[str] | None = None) -> Path:
    """The distilled images of one cell (ipc 1): one column per class."""
    images, labels = _images(_cell_dir(sweep_dir, results, method, 1, pipc))
    classes = sorted(set(labels.tolist()))
    fig, axes = plt.subplots(1, len(classes), figsize=(1.3 * len(classes), 1.6), squeeze=False)
    for ax, c in zip(axes[0], classes, strict=True):
        _show(ax, images[labels == c][0])
        ax.set_title(class_names[c] if class_names else str(c), fontsize=8)
        ax.axis("off")
    fig.suptitle(f"Distilled images ({method}, ipc 1, pipc {pipc})", fontsize=9)
    return _save_figure(fig, path)


def class_means(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(classes, H, W, C) average image per class."""
    return np.stack([images[labels == c].mean(axis=0) for c in sorted(set(labels.tolist()))])


def fft_magnitude(image: np.ndarray) -> np.ndarray:
    """log(1 + |FFT2|) of the grey-level image, zero frequency centred."""
    grey = torch.as_tensor(image.mean(axis=-1))
    spectrum = torch.fft.fftshift(torch.fft.fft2(grey - grey.mean()))
    return torch.log1p(spectrum.abs()).numpy()


def figure3(sweep_dir: Path, results: pd.DataFrame, path: Path, dsv_method: str = "dm+dkkt", ipc: int | None = None,
            class_names: list[str] | None = None) -> Path:
    """Rows: per-class mean of `dsv_method` images, of DM images, and the FFT magnitude of each (at the largest ipc
    both have, unless `ipc` is given)."""
    both = set(results[results["method"] == "dm"]["ipc"]) & set(results[results["method"] == dsv_method]["ipc"])
    ipc = ipc or int(max(both))
    rows = []
    for method in (dsv_method, "dm"):
        means = class_means(*_images(_cell_dir(sweep_dir, results, method, ipc, None)))
        rows.append((f"{method}: class mean", np.clip(means, 0, 1), None))
        rows.append((f"{method}: |FFT|", np.stack([fft_magnitude(m) for m in means]), "magma"))
    num_classes = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), num_classes, figsize=(1.3 * num_classes, 1.4 * len(rows)), squeeze=False)
    for r, (title, images, cmap) in enumerate(rows):
        for c in range(num_classes):
            _show(axes[r][c], images[c], cmap)
            axes[r][c].axis("off")
            if r == 0:
                axes[r][c].set_title(class_names[c] if class_names else str(c), fontsize=8)
        axes[r][0].text(-0.1, 0.5, title, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Per-class average and 2-D FFT magnitude (ipc {ipc})", fontsize=9)
    return _save_figure(fig, path)


def plot_method_bars(results: pd.DataFrame, path: Path) -> Path:
    """Test accuracy (mean ± std over seeds x nets) per method, grouped by ipc."""
    stats = pooled(results)
    methods = _methods(stats)
    ipcs = sorted(set(stats["ipc"]))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(methods) * len(ipcs) / 2, 3.2))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        rows = stats[stats["method"] == method].set_index("ipc")
        xs = [i + k * width for i, ipc in enumerate(ipcs) if ipc in rows.index]
        present = [ipc for ipc in ipcs if ipc in rows.index]
        ax.bar(xs, rows.loc[present, "mean"], width, yerr=rows.loc[present, "std"], label=method, capsize=2)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ipcs))], [f"ipc {ipc}" for ipc in ipcs])
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    return _save_figure(fig, path)


def plot_history(history_file: Path, path: Path) -> Path:
    """Loss terms (log scale) and the DKKT share of the image gradient over the iterations of one run."""
    lines = [json.loads(x) for x in Path(history_file).read_text().splitlines() if x.strip()]
    fig, (losses, shares) = plt.subplots(1, 2, figsize=(9, 3.2))
    def series(key: str) -> tuple[list[int], list[float]]:  # a DM-then-DKKT run logs the DKKT keys from its switch on
        kept = [x for x in lines if key in x]
        return [x["iteration"] for x in kept], [x[key] for x in kept]

    for key in ("dm", "dkkt", "stat", "primal", "stat_aug"):
        if any(key in x for x in lines):
            its, values = series(key)
            losses.semilogy(its, [max(v, 1e-12) for v in values], label=key)
    losses.set_xlabel("iteration")
    losses.set_title("loss terms", fontsize=9)
    losses.legend(fontsize=7)
    drawn = False
    for key, label in (("share_dkkt", "DKKT share of the image gradient"), ("stat_rel", "L_stat / mean|θ*|"),
                       ("lambda_mean", "λ mean")):
        if any(key in x for x in lines):
            shares.plot(*series(key), label=label)
            drawn = True
    if drawn:
        shares.set_xlabel("iteration")
        shares.set_title("gradient share, stationarity, λ", fontsize=9)
        shares.legend(fontsize=7)
    else:
        shares.set_axis_off()  # no DKKT term in this run
    return _save_figure(fig, path)


def _cell_results(sweep_dir: Path, results: pd.DataFrame) -> list[dict]:
    return [json.loads((Path(sweep_dir) / "cells" / cell / "result.json").read_text()) for cell in results["cell"]]


def protocol_line(sweep_dir: Path, results: pd.DataFrame) -> str:
    """Protocol: distillation iterations, evaluation epochs and nets, seeds, and the commits that made the cells."""
    cells = _cell_results(sweep_dir, results)
    def values(section: str, key: str) -> str:
        return "/".join(str(v) for v in sorted({c["config"][section][key] for c in cells}))
    commits = ", ".join(sorted({c.get("commit", "unknown") for c in cells}))
    return (f"Protocol: {values('distill', 'iterations')} distillation iterations, {values('evaluation', 'epochs')} "
            f"evaluation epochs, {values('evaluation', 'num_nets')} nets per seed, seeds "
            f"{', '.join(map(str, sorted(set(results['seed']))))}; commit {commits}.")


def cross_arch_table(sweep_dir: Path, results: pd.DataFrame) -> str | None:
    """Test accuracy (%) of each cell's synthetic set on the sweep's other architectures, beside the ConvNet's."""
    rows = []
    for _, row in results.iterrows():
        path = Path(sweep_dir) / "cells" / row["cell"] / "cross_arch.json"
        if path.is_file():
            rows.append((row, json.loads(path.read_text())))
    if not rows:
        return None
    archs = sorted({a for _, cross in rows for a in cross})
    lines = ["| ipc | pipc | method | seed | convnet (the model's) | " + " | ".join(archs) + " |",
             "|---|---|---|---|---|" + "---|" * len(archs)]
    for row, cross in rows:
        cells = [f"{100 * cross[a]['mean']:.1f} ± {100 * cross[a]['std']:.1f}" if a in cross else "-" for a in archs]
        lines.append(f"| {row['ipc']} | {row['pipc']} | {row['method']} | {row['seed']} | "
                     f"{100 * row['accuracy_mean']:.1f} ± {100 * row['accuracy_std']:.1f} | " + " | ".join(cells) + " |")
    return "Cross-architecture evaluation (test accuracy %, same synthetic set and evaluation protocol):\n\n" + "\n".join(lines)


def render(sweep_dir: Path, out_dir: Path | None = None, class_names: list[str] | None = None) -> dict[str, Path]:
    """Writes every report artefact the finished cells allow; returns name -> path."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir / "report")
    results = load_results(sweep_dir)
    text = "\n\n".join(filter(None, [protocol_line(sweep_dir, results), markdown_table(results),
                                      cross_arch_table(sweep_dir, results)]))
    written = {"table": atomic_write(out_dir / "table.md", lambda tmp: tmp.write_text(text))}
    written["plot"] = plot_accuracy_vs_pipc(results, out_dir / "accuracy_vs_pipc.png")
    methods = set(results["method"])
    fig2_method = "dm+dkkt" if "dm+dkkt" in methods else sorted(methods)[0]
    if 1 in set(results["ipc"]):
        pipc = 50 if 50 in set(results["pipc"]) else None
        written["figure2"] = figure2(sweep_dir, results, out_dir / "figure2.png", fig2_method, pipc, class_names)
    dsv_method = next((m for m in ("dsv", "dm+dkkt") if m in methods), None)  # pure DSVs first, else DM + DKKT
    if dsv_method and "dm" in methods and set(results[results["method"] == "dm"]["ipc"]) & set(
            results[results["method"] == dsv_method]["ipc"]):
        written["figure3"] = figure3(sweep_dir, results, out_dir / "figure3.png", dsv_method, class_names=class_names)
    histories = {f"{row['method']} ipc {row['ipc']} seed {row['seed']}":
                 Path(sweep_dir) / "cells" / row["cell"] / "seed_0" / "history.jsonl"
                 for _, row in results.sort_values(["ipc", "method", "seed"]).drop_duplicates(["ipc", "method"]).iterrows()}
    histories = {name: path for name, path in histories.items() if path.is_file()}
    if histories:
        written["curves"] = plot_loss_curves(histories, out_dir / "loss_curves.png")
    return written


def plot_loss_curves(histories: dict[str, Path], path: Path) -> Path:
    """The loss of each run over its iterations (DM's for methods with DM, else DKKT's), one line per run."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, history_file in histories.items():
        lines = [json.loads(x) for x in history_file.read_text().splitlines() if x.strip()]
        key = "dm" if "dm" in lines[0] else "dkkt"
        ax.semilogy([x["iteration"] for x in lines], [max(x[key], 1e-12) for x in lines], label=f"{name} ({key})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.legend(fontsize=6)
    return _save_figure(fig, path)


def render_run(run_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """A federation run's report: the per-round test accuracy curve and each distilled method's loss curves."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir or run_dir / "report")
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["round"] for r in rounds], [100 * r["test_accuracy"] for r in rounds], marker="o", label="global model (test)")
    held = [(r["round"], r["client_eval_accuracy"]) for r in rounds if r.get("client_eval_accuracy") is not None]
    if held:
        ax.plot(*zip(*[(k, 100 * a) for k, a in held], strict=True), marker=".", label="clients' held-out slices")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    written = {"rounds": _save_figure(fig, out_dir / "federation_accuracy.png")}
    for history in sorted(run_dir.glob("distill/*/seed_0/history.jsonl")):
        method = history.parent.parent.name
        written[f"history {method}"] = plot_history(history, out_dir / f"distill_{method}.png")
    return written
