"""The leakage audit: does a synthetic set look more like the edge's private images than like images nobody has seen?

An offline evaluation for a data owner who can read the private pool (`common.holdings`); it never runs inside the
ServerApp, which must not see that pool. Plain functions over tensors; `simulations/commands/audit_sets.py` finds the sets
and writes the outputs. Every image is compared as its PNG shows it: [0, 1] pixels, a synthetic set de-normalised
with its recorded normalisation and clamped.

Pools, as indices into train ++ test (test image j is len(train) + j), from the set's own config and holdings:
  private    every image some edge client holds;
  reference  held-out images nobody trains on: the validation slice and the test split's reference half (the other
             half trains the feature net); `reference_sample` takes, per class, as many as a private fold, and the
             private pool is cut into class-matched folds of that size (nearest-neighbour distances shrink as a pool
             grows, so only same-size pools are compared);
  public     the server's public subset;
  null       real images in no pool above nor in the reference sample (every public and unheld training image, and
             up to NULL_HELD_OUT_PER_CLASS reference images per class from outside the sample): the "synthetic sets"
             that calibrate the per-image flag.

Two spaces: pixels (L2, as RMSE in [0, 1] units; SSIM on the `SSIM_CANDIDATES` nearest by L2 of each pool) and the
features of a ConvNet-3 trained here on the test split's feature half (`train_feature_net`): independent of the
received model and of every pool it is compared with (unit-length trunk features, L2 distance).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.config import ExperimentConfig, ModelConfig
from common.data import Dataset, Normalization, to_normalized_tensor
from common.holdings import decide_holdings
from common.models import model_from_config
from common.training import TrainSettings, evaluate, train_local

AUDIT_STREAM = 3  # the audit's random stream: (seed, 3), apart from the holdings' streams
TARGET_FPR = 0.01  # the per-image flag's false-positive rate on the null images
SSIM_CANDIDATES = 10  # SSIM is computed against this many nearest images (by pixel L2) of each pool
BOOTSTRAP = 2000  # resamples of the percentile bootstrap
CHUNK = 256  # query images per distance block
NULL_HELD_OUT_PER_CLASS = 100  # held-out images per class among the null images (at most; beside every training one)


@dataclass(frozen=True)
class Pools:
    """Index arrays into train ++ test (see the module docstring); `folds` are positions into `private`."""

    private: np.ndarray
    folds: tuple[np.ndarray, ...]
    reference: np.ndarray  # every held-out image (the AUC's non-members)
    reference_sample: np.ndarray  # per class as many as a fold (the nearest-neighbour comparisons)
    public: np.ndarray
    null: np.ndarray
    null_public: int  # the first `null_public` of `null` are training images (public or unheld), the rest held-out


def test_halves(test_labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The test split's (feature half, reference half): half of each class each, sorted, from the audit's stream."""
    rng = np.random.default_rng([seed, AUDIT_STREAM])
    feature, reference = [], []
    for c in range(int(test_labels.max()) + 1):
        members = rng.permutation(np.flatnonzero(test_labels == c))
        feature.append(members[: len(members) // 2])
        reference.append(members[len(members) // 2:])
    return np.sort(np.concatenate(feature)), np.sort(np.concatenate(reference))


def audit_pools(cfg: ExperimentConfig, dataset: Dataset, seed: int) -> Pools:
    """The pools of `cfg`'s holdings over `dataset` (module docstring); ValueError when a class has no private or
    reference image."""
    train_labels, test_labels = dataset.train.labels, dataset.test.labels
    n_train = len(train_labels)
    holdings = decide_holdings(cfg, train_labels)
    private = holdings.private
    reference = np.concatenate([holdings.validation, n_train + test_halves(test_labels, seed)[1]])
    labels = np.concatenate([train_labels, test_labels])
    rng = np.random.default_rng([seed, AUDIT_STREAM, 1])
    folds: list[list[np.ndarray]] = []
    sample = []
    for c in range(dataset.num_classes):
        mine = np.flatnonzero(labels[private] == c)
        held = reference[labels[reference] == c]
        if len(mine) == 0 or len(held) < 2:
            raise ValueError(f"class {c}: {len(mine)} private and {len(held)} held-out images; the audit needs at "
                             "least 1 private and 2 held-out images of every class")
        size = min(len(mine), len(held) // 2)  # at most half the held-out images: the rest calibrate the flag
        sample.append(rng.choice(held, size=size, replace=False))
        order = rng.permutation(mine)
        count = math.ceil(len(mine) / size)  # folds cover the pool; the last one wraps to the first images
        folds.append([order[(k * size + np.arange(size)) % len(mine)] for k in range(count)])
    num_folds = max(len(f) for f in folds)
    fold_positions = tuple(
        np.sort(np.concatenate([f[k % len(f)] for f in folds])) for k in range(num_folds)
    )
    reference_sample = np.sort(np.concatenate(sample))
    unheld_train = np.setdiff1d(np.arange(n_train), np.concatenate([private, holdings.validation]))
    rest = np.setdiff1d(reference, reference_sample)
    held_out_null = np.concatenate([rng.permutation(rest[labels[rest] == c])[:NULL_HELD_OUT_PER_CLASS]
                                    for c in range(dataset.num_classes)])
    null = np.concatenate([unheld_train, np.sort(held_out_null)])
    return Pools(private, fold_positions, np.sort(reference), reference_sample, holdings.public, null, len(unheld_train))


# --- the feature space --------------------------------------------------------------------------------------------

# The project's ConvNet-3 at width 16, 5 epochs of the edge's local training loop: small enough to train and to embed
# all 60,000 CIFAR-10 images on 2 CPU cores shared with a benchmark (width 128 costs ~40x more per image).
FEATURE_MODEL = ModelConfig(width=16)
FEATURE_TRAINING = TrainSettings(epochs=5, batch_size=64, lr=0.01, momentum=0.9, weight_decay=5e-4)


def train_feature_net(dataset: Dataset, seed: int, epochs: int = FEATURE_TRAINING.epochs) -> tuple[torch.nn.Module, dict]:
    """A ConvNet-3 trained (the project's local training loop, flip+crop) on the test split's feature half only;
    returns it and its record (seed, epochs, accuracy on the reference half)."""
    feature, reference = test_halves(dataset.test.labels, seed)
    norm = dataset.normalization
    torch.manual_seed(seed)
    net = model_from_config(FEATURE_MODEL, dataset.num_classes, dataset.channels, dataset.image_size)
    x = to_normalized_tensor(dataset.test.images[feature], norm)
    settings = TrainSettings(**{**FEATURE_TRAINING.__dict__, "epochs": epochs})
    result = train_local(net, x, torch.as_tensor(dataset.test.labels[feature]), settings, seed)
    _, accuracy = evaluate(net, to_normalized_tensor(dataset.test.images[reference], norm),
                           torch.as_tensor(dataset.test.labels[reference]))
    record = {"dataset": dataset.name, "test_images": len(dataset.test), "seed": seed, "epochs": epochs,
              "train_images": len(feature), "model": FEATURE_MODEL.model_dump(), "train_loss": result.loss,
              "reference_half_accuracy": accuracy, "train_seconds": result.seconds}
    return net.eval(), record


def feature_embedder(net: torch.nn.Module, norm: Normalization) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] pixels (N, C, H, W) -> unit-length trunk features of `net` (N, D)."""

    @torch.no_grad()
    def embed(pixels: torch.Tensor) -> torch.Tensor:
        mean, std = norm.broadcast(pixels)
        rows = [F.normalize(net.embed((part - mean) / std), dim=1) for part in pixels.split(500)]
        return torch.cat(rows)

    return embed


def pixel_rows(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels (N, C, H, W) -> flat rows scaled so that their L2 distance is the per-pixel RMSE."""
    return pixels.flatten(1) / math.sqrt(pixels[0].numel())


# --- distances and SSIM -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Nearest:
    """Per query: distance and index (into the pool's rows) of its nearest row, its nearest row within each fold
    (when folds are given), the `k` nearest rows; per pool row: its distance to the nearest query."""

    distance: torch.Tensor  # (Q,)
    index: torch.Tensor  # (Q,)
    fold_distance: torch.Tensor  # (Q, K), K = 0 without folds
    topk: torch.Tensor  # (Q, k) indices
    row_distance: torch.Tensor  # (P,)


def nearest(queries: torch.Tensor, rows: torch.Tensor, folds: tuple[np.ndarray, ...] = (), k: int = 0) -> Nearest:
    """Euclidean nearest neighbours of `queries` (Q, D) among `rows` (P, D), computed in blocks of CHUNK queries."""
    distance, index, fold_distance, topk = [], [], [], []
    row_distance = torch.full((len(rows),), math.inf)
    fold_index = [torch.as_tensor(f) for f in folds]
    for part in queries.split(CHUNK):
        block = torch.cdist(part, rows).clamp_min_(0.0)
        best = block.min(1)
        distance.append(best.values)
        index.append(best.indices)
        fold_distance.append(torch.stack([block[:, f].min(1).values for f in fold_index], 1) if folds
                             else block.new_zeros((len(part), 0)))
        topk.append(block.topk(min(k, len(rows)), dim=1, largest=False).indices)
        row_distance = torch.minimum(row_distance, block.min(0).values)
    return Nearest(torch.cat(distance), torch.cat(index), torch.cat(fold_distance), torch.cat(topk), row_distance)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al., 2004: 11x11 Gaussian window, sigma 1.5, valid positions, data range 1) of paired [0, 1]
    images (N, C, H, W), averaged over channels and positions: (N,)."""
    channels = a.shape[1]
    size = min(11, a.shape[-1])
    window = _gaussian_window(size).expand(channels, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.flatten(1).mean(1)


def best_ssim(queries: torch.Tensor, pool: torch.Tensor, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query (Q, C, H, W): the highest SSIM over its candidate rows of `pool` (Q, k) and that row's index."""
    q, k = candidates.shape
    values = ssim(queries.repeat_interleave(k, 0), pool[candidates.flatten()]).view(q, k)
    best = values.max(1)
    return best.values, candidates.gather(1, best.indices[:, None])[:, 0]


# --- statistics ---------------------------------------------------------------------------------------------------


def wilson(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of a binomial proportion."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean(values: np.ndarray, seed: int, resamples: int = BOOTSTRAP) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the mean of `values` (resampled with replacement)."""
    rng = np.random.default_rng([seed, AUDIT_STREAM, 2])
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    return (float(low), float(high))


def auc_delong(members: np.ndarray, others: np.ndarray) -> tuple[float, tuple[float, float]]:
    """P(member score > other score) + half the ties, with DeLong's 95 % interval (normal approximation)."""
    sorted_others, sorted_members = np.sort(others), np.sort(members)
    below = np.searchsorted(sorted_others, members, "left")
    ties = np.searchsorted(sorted_others, members, "right") - below
    v10 = (below + 0.5 * ties) / len(others)  # per member: the share of others it beats
    above = len(members) - np.searchsorted(sorted_members, others, "right")
    ties = np.searchsorted(sorted_members, others, "right") - np.searchsorted(sorted_members, others, "left")
    v01 = (above + 0.5 * ties) / len(members)  # per other: the share of members that beat it
    auc = float(v10.mean())
    se = math.sqrt(v10.var(ddof=1) / len(members) + v01.var(ddof=1) / len(others)) if min(len(members), len(others)) > 1 else 0.0
    return auc, (max(0.0, auc - 1.959964 * se), min(1.0, auc + 1.959964 * se))


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return float(min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))))


def flag_threshold(null_ratios: np.ndarray, target: float = TARGET_FPR) -> float:
    """The largest threshold t with at most floor(target * n) null ratios below it: flag an image when ratio < t."""
    ordered = np.sort(null_ratios)
    return float(ordered[min(int(math.floor(target * len(ordered))), len(ordered) - 1)])


# --- the positive control ---------------------------------------------------------------------------------------


def plant(pixels: torch.Tensor, labels: torch.Tensor, private_pixels: torch.Tensor, private_labels: torch.Tensor,
          count: int, seed: int, noise: float = 0.03, brightness: float = 0.05
          ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """The set with `count` random images replaced by exact private images and `count` more by lightly perturbed
    private copies (Gaussian noise of std `noise`, brightness scaled by 1 +- `brightness`, clamped to [0, 1]).
    Returns pixels, labels, the replaced positions and the planted private images' positions in `private_pixels`."""
    rng = np.random.default_rng([seed, AUDIT_STREAM, 3])
    positions = rng.choice(len(pixels), size=2 * count, replace=False)
    sources = rng.choice(len(private_pixels), size=2 * count, replace=False)
    generator = torch.Generator().manual_seed(seed)
    copies = private_pixels[torch.as_tensor(sources)].clone()
    light = copies[count:]
    scale = 1 + brightness * (2 * torch.rand(count, 1, 1, 1, generator=generator) - 1)
    copies[count:] = (light * scale + noise * torch.randn(light.shape, generator=generator)).clamp(0.0, 1.0)
    pixels, labels = pixels.clone(), labels.clone()
    pixels[torch.as_tensor(positions)] = copies
    labels[torch.as_tensor(positions)] = private_labels[torch.as_tensor(sources)]
    return pixels, labels, positions, sources


# --- one space, prepared once per pools ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Space:
    """A space images are compared in: the rows of each pool, and the null images' scores that calibrate the flag."""

    name: str
    embed: Callable[[torch.Tensor], torch.Tensor]  # [0, 1] pixels (N, C, H, W) -> rows (N, D)
    scale: float  # distances are multiplied by it (pixels: 1 / sqrt(C*H*W), so that they read as an RMSE)
    private: torch.Tensor
    reference_sample: torch.Tensor
    reference: torch.Tensor
    public: torch.Tensor
    null: torch.Tensor
    null_ratio: np.ndarray  # per null image: nearest private distance / nearest reference-sample distance
    null_closer: np.ndarray  # per null image: the share of folds whose nearest image is nearer than the reference's

    @property
    def threshold(self) -> float:
        return flag_threshold(self.null_ratio)


def prepare_space(name: str, rows: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], scale: float,
                  pools: Pools) -> Space:
    """`rows` (train ++ test, D) cut into the pools, and the null images scored as a synthetic set would be."""
    def take(index: np.ndarray) -> torch.Tensor:
        return rows[torch.as_tensor(index)]

    private, sample, null = take(pools.private), take(pools.reference_sample), take(pools.null)
    ratio, closer = ratio_closer(nearest(null, private, pools.folds), nearest(null, sample))
    return Space(name, embed, scale, private, sample, take(pools.reference), take(pools.public), null, ratio, closer)


def ratio_closer(to_private: Nearest, to_sample: Nearest) -> tuple[np.ndarray, np.ndarray]:
    """Per query: nearest private / nearest reference-sample distance (the flag's score), and the share of private
    folds whose nearest image is nearer than the nearest reference-sample image (0.5 expected when nothing leaks)."""
    reference = to_sample.distance
    ratio = to_private.distance / reference.clamp_min(1e-12)
    closer = (to_private.fold_distance < reference[:, None]).float().mean(1)
    return ratio.numpy(), closer.numpy()


def calibration(space: Space, pools: Pools) -> dict:
    """The flag's threshold and its false-positive rate on the null images (all of them, the training ones, the
    held-out ones), each with its Wilson interval."""
    flagged = space.null_ratio < space.threshold
    parts = {"all": slice(None), "public": slice(0, pools.null_public), "held_out": slice(pools.null_public, None)}
    out: dict = {"threshold": space.threshold, "target_fpr": TARGET_FPR}
    for part, where in parts.items():
        k, n = int(flagged[where].sum()), int(flagged[where].size)
        out[f"fpr_{part}"] = {"flagged": k, "images": n, "rate": k / n if n else None, "wilson95": wilson(k, n)}
    return out


def null_fractions(space: Space, pools: Pools, seed: int) -> dict:
    """The closer-to-private fraction of the null's training images (public and unheld: the null of a set made from
    public images) and of its held-out images, each with its bootstrap interval."""
    parts = {"public": space.null_closer[: pools.null_public], "held_out": space.null_closer[pools.null_public:]}
    return {part: {"fraction": float(v.mean()), "bootstrap95": bootstrap_mean(v, seed), "images": len(v)}
            for part, v in parts.items() if len(v)}


def membership_auc(space: Space, queries: torch.Tensor, to_private: torch.Tensor | None = None
                   ) -> tuple[float, tuple[float, float]]:
    """Private vs reference images, each scored by its closeness to the nearest of `queries` (rows): the AUC that
    a private image is closer (0.5 when the set is as near to images nobody has seen), DeLong interval.
    `to_private`: each private image's distance to the nearest query, when already computed."""
    if to_private is None:
        to_private = nearest(queries, space.private).row_distance
    to_reference = nearest(queries, space.reference).row_distance
    return auc_delong(-to_private.numpy(), -to_reference.numpy())


def null_auc(space: Space, pools: Pools, size: int, seed: int) -> dict | None:
    """The membership AUC of `size` real training images nobody private holds (drawn from the null's training
    part): what a set that leaks nothing scores, any train-versus-held-out shift included. None without such images."""
    if pools.null_public == 0:
        return None
    rng = np.random.default_rng([seed, AUDIT_STREAM, 4, size])
    chosen = torch.as_tensor(rng.choice(pools.null_public, size=min(size, pools.null_public), replace=False))
    auc, interval = membership_auc(space, space.null[chosen])
    return {"auc": auc, "delong95": interval, "images": len(chosen)}


# --- one set ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Audit:
    """One set's audit: a column per CSV field (one value per synthetic image) and the summary."""

    columns: dict[str, np.ndarray]
    summary: dict


def audit_set(pixels: torch.Tensor, labels: torch.Tensor, pools: Pools, spaces: list[Space], seed: int,
              null_aucs: dict[str, dict | None]) -> Audit:
    """Audits `pixels` ([0, 1], (N, C, H, W)) with `labels` in every space (the first is the pixel space, where
    SSIM is also computed); `null_aucs` maps a space name to its `null_auc` at this set's size."""
    columns: dict[str, np.ndarray] = {"position": np.arange(len(labels)), "label": labels.numpy()}
    summary: dict = {"images": len(labels)}
    pool_index = {"private": pools.private, "reference": pools.reference_sample, "public": pools.public}
    for number, space in enumerate(spaces):
        queries = space.embed(pixels)
        k = SSIM_CANDIDATES if number == 0 else 0
        found = {"private": nearest(queries, space.private, pools.folds, k),
                 "reference": nearest(queries, space.reference_sample, k=k),
                 "public": nearest(queries, space.public, k=k)}
        for pool, result in found.items():
            columns[f"{space.name}_{pool}"] = (result.distance * space.scale).numpy()
            columns[f"{space.name}_{pool}_image"] = pool_index[pool][result.index.numpy()]
            if number == 0:
                rows = getattr(space, "reference_sample" if pool == "reference" else pool)
                value, _ = best_ssim(pixels, rows.view(-1, *pixels.shape[1:]), result.topk)
                columns[f"ssim_{pool}"] = value.numpy()
        ratio, closer = ratio_closer(found["private"], found["reference"])
        flags = ratio < space.threshold
        columns.update({f"{space.name}_ratio": ratio, f"{space.name}_closer": closer, f"{space.name}_flag": flags})
        fpr_high = calibration(space, pools)["fpr_all"]["wilson95"][1]
        auc, interval = membership_auc(space, queries, found["private"].row_distance)
        summary[space.name] = {
            "fraction_closer_private": float(closer.mean()), "bootstrap95": bootstrap_mean(closer, seed),
            "null_fraction": null_fractions(space, pools, seed),
            "auc": auc, "delong95": interval, "null_auc": null_aucs.get(space.name),
            "flagged": int(flags.sum()),
            # the set as a whole: P(this many flags or more) if each image were flagged at the FPR's upper bound
            "set_p_value": binomial_tail(int(flags.sum()), len(flags), fpr_high),
            "median_to_public": float(np.median(columns[f"{space.name}_public"])),
            "median_to_private": float(np.median(columns[f"{space.name}_private"])),
            "median_to_reference": float(np.median(columns[f"{space.name}_reference"])),
        }
    return Audit(columns, summary)
