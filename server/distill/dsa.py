"""Differentiable Siamese Augmentation (DSA) as used by the DM reference, vectorised over groups.

The DM reference (`utils.DiffAugment`, `aug_mode='S'`) applies ONE transform family per call, drawn
uniformly from the strategy string; with a seed it applies one parameter draw to a whole batch, and
the same seed is used for the real and the synthetic images of a class ("Siamese"). Here a draw is
an explicit `DSAParams` object holding one family and one parameter set per *group*; `apply_dsa`
expands them to the samples through a `groups` index, so one call augments all classes at once,
and calling it on the real and on the synthetic batch with the same params is the Siamese pairing.

All parameters are stored as uniform [0, 1) draws and mapped to transform values at apply time,
so a draw does not depend on the image size. Every transform is differentiable w.r.t. the input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"

# utils.ParamDiffAug of the DM reference.
PROB_FLIP = 0.5
RATIO_SCALE = 1.2
RATIO_ROTATE = 15.0  # degrees
RATIO_CROP_PAD = 0.125
RATIO_CUTOUT = 0.5
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5


def parse_strategy(strategy: str | Sequence[str]) -> tuple[str, ...]:
    """'color_crop_...' -> ('color', 'crop', ...); '' or 'none' -> () (no augmentation)."""
    if isinstance(strategy, str):
        names = [] if strategy in ("", "none") else strategy.split("_")
    else:
        names = list(strategy)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"dsa_strategy: unknown transform(s) {unknown}; allowed: {'_'.join(FAMILIES)} (or 'none')")
    return tuple(names)


@dataclass(frozen=True)
class DSAParams:
    """One augmentation draw: a family index into `families` and uniform [0, 1) parameters, per group (G,)."""

    families: tuple[str, ...]
    family: torch.Tensor  # (G,) int64
    brightness: torch.Tensor
    saturation: torch.Tensor
    contrast: torch.Tensor
    crop_h: torch.Tensor
    crop_w: torch.Tensor
    cutout_h: torch.Tensor
    cutout_w: torch.Tensor
    flip: torch.Tensor
    scale_h: torch.Tensor
    scale_w: torch.Tensor
    rotate: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.family.shape[0]

    def select(self, index: torch.Tensor | int) -> DSAParams:
        """The draw restricted to some groups (an int keeps one group)."""
        index = torch.as_tensor(index, device=self.family.device).reshape(-1)
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "families"}
        return DSAParams(self.families, **{k: v[index] for k, v in values.items()})


_UNIFORM_FIELDS = tuple(f.name for f in fields(DSAParams) if f.name not in ("families", "family"))


def sample_dsa(
    strategy: str | Sequence[str],
    num_groups: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    one_family: bool = False,
) -> DSAParams:
    """Draws one family and one parameter set per group (`one_family`: a single family for all groups,
    as the reference does for an unseeded call, i.e. its evaluation batches)."""
    families = parse_strategy(strategy)
    device = torch.device(device) if device is not None else (generator.device if generator is not None else None)
    n_fam = max(len(families), 1)
    family = torch.randint(0, n_fam, (1 if one_family else num_groups,), generator=generator, device=device)
    family = family.expand(num_groups).contiguous()
    u = torch.rand(len(_UNIFORM_FIELDS), num_groups, generator=generator, device=device)
    return DSAParams(families, family, **dict(zip(_UNIFORM_FIELDS, u.unbind(0), strict=True)))


def apply_dsa(
    x: torch.Tensor, params: DSAParams | None, groups: torch.Tensor | None = None, path: str = "auto"
) -> torch.Tensor:
    """Augments x (N, C, H, W); sample i uses the draw of group `groups[i]` (default: group i).

    Equal draws give equal transforms whatever else is in the batch; differentiable w.r.t. x.
    Two ways to compute the same values (`path`):
      'where':  every family's transform on the whole batch, then a per-sample select; no host sync, so
                the one for draws living on a GPU;
      'subset': each family present only on the samples that drew it (one transform for a one-family
                draw); needs the families on the host, so it is used when `params.family` is a CPU tensor;
      'auto':   'subset' when `params.family` is on the CPU, else 'where'.
    """
    if params is None or not params.families:
        return x
    if groups is None:
        if x.shape[0] != params.num_groups:
            raise ValueError(f"apply_dsa: {x.shape[0]} samples but {params.num_groups} groups and no groups index")
        groups = torch.arange(x.shape[0], device=params.family.device)
    if path == "auto":
        path = "subset" if params.family.device.type == "cpu" else "where"
    if path == "subset":
        return _apply_subset(x, params, groups)
    if path != "where":
        raise ValueError(f"apply_dsa: path must be auto, where or subset; got {path!r}")
    p = params.select(groups)
    fam = p.family.to(x.device)
    out = x
    # Each sample gets exactly one family, so every transform can read the input x; scale and rotate share
    # one resampling (a per-sample affine matrix), which halves the grid_sample work of this path.
    affine_done = False
    for k, name in enumerate(params.families):
        chosen = fam == k
        if name in ("scale", "rotate"):
            if affine_done:
                continue
            affine_done = True
            kinds = [params.families.index(f) for f in ("scale", "rotate") if f in params.families]
            chosen = (fam.unsqueeze(1) == torch.tensor(kinds, device=x.device)).any(1)
            transformed = _affine(x, p, fam_index=fam, families=params.families)
        else:
            transformed = _TRANSFORMS[name](x, p)
        out = torch.where(chosen.view(-1, 1, 1, 1), transformed, out)
    return out


def _apply_subset(x: torch.Tensor, params: DSAParams, groups: torch.Tensor) -> torch.Tensor:
    """apply_dsa computing each present family only on its own samples (families known on the host)."""
    fam = params.family[groups.to(params.family.device)]
    present = fam.unique().tolist()
    if len(present) == 1:
        p = params.select(groups)
        return _TRANSFORMS[params.families[present[0]]](x, _on(p, x.device))
    out = torch.empty_like(x)
    for k in present:
        rows = torch.nonzero(fam == k).flatten()
        p = _on(params.select(groups.to(rows.device)[rows]), x.device)
        rows = rows.to(x.device)
        out = out.index_copy(0, rows, _TRANSFORMS[params.families[k]](x.index_select(0, rows), p))
    return out


def _on(p: DSAParams, device: torch.device) -> DSAParams:
    values = {f.name: getattr(p, f.name).to(device) for f in fields(p) if f.name != "families"}
    return DSAParams(p.families, **values)


def _flip(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    return torch.where((p.flip < PROB_FLIP).to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


def _color(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Brightness, then saturation, then contrast (the reference's 'color')."""
    x = x + ((p.brightness - 0.5) * BRIGHTNESS).to(x.dtype).view(-1, 1, 1, 1)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (p.saturation * SATURATION).to(x.dtype).view(-1, 1, 1, 1) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (p.contrast + CONTRAST).to(x.dtype).view(-1, 1, 1, 1) + mean


def _crop(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Integer translation by up to RATIO_CROP_PAD of the size, zero-filled (the reference's 'crop')."""
    n, _, h, w = x.shape
    sh, sw = int(h * RATIO_CROP_PAD + 0.5), int(w * RATIO_CROP_PAD + 0.5)
    th = (p.crop_h * (2 * sh + 1)).long().clamp(max=2 * sh) - sh
    tw = (p.crop_w * (2 * sw + 1)).long().clamp(max=2 * sw) - sw
    rows = (torch.arange(h, device=x.device).view(1, h) + th.view(n, 1) + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device).view(1, w) + tw.view(n, 1) + 1).clamp(0, w + 1)
    padded = F.pad(x, (1, 1, 1, 1))
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded[batch, :, rows.view(n, h, 1), cols.view(n, 1, w)].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, p: DSAParams) -> torch.Tensor:
    """Zeroes a square of RATIO_CUTOUT of the size centred anywhere in the image (the reference's 'cutout')."""
    n, _, h, w = x.shape
    ch, cw = int(h * RATIO_CUTOUT + 0.5), int(w * RATIO_CUTOUT + 0.5)
    top = (p.cutout_h * (h + 1 - ch % 2)).long() - ch // 2
    left = (p.cutout_w * (w + 1 - cw % 2)).long() - cw // 2
    r = torch.arange(h, device=x.device).view(1, h)
    c = torch.arange(w, device=x.device).view(1, w)
    in_rows = (r >= top.view(n, 1)) & (r < (top + ch).view(n, 1))
    in_cols = (c >= left.view(n, 1)) & (c < (left + cw).view(n, 1))
    keep = ~(in_rows.view(n, h, 1) & in_cols.view(n, 1, w))
    return x * keep.unsqueeze(1).to(x.dtype)


def _affine(
    x: torch.Tensor,
    p: DSAParams,
    name: str | None = None,
    fam_index: torch.Tensor | None = None,
    families: tuple[str, ...] = (),
) -> torch.Tensor:
    """Bilinear resampling with a per-sample scale (1/r..r per axis) or rotation (+-RATIO_ROTATE degrees).

    `name` applies one kind to every sample; otherwise sample i is rotated where fam_index[i] is the
    index of 'rotate' in `families`, and scaled elsewhere.
    """
    n = x.shape[0]
    scale = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    scale[:, 0, 0] = p.scale_w * (RATIO_SCALE - 1.0 / RATIO_SCALE) + 1.0 / RATIO_SCALE  # x = width axis
    scale[:, 1, 1] = p.scale_h * (RATIO_SCALE - 1.0 / RATIO_SCALE) + 1.0 / RATIO_SCALE
    rotate = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    angle = (p.rotate - 0.5) * 2 * RATIO_ROTATE / 180 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotate[:, 0, 0], rotate[:, 0, 1], rotate[:, 1, 0], rotate[:, 1, 1] = cos, -sin, sin, cos
    if name is not None:
        theta = scale if name == "scale" else rotate
    elif "rotate" in families:
        is_rotate = fam_index == families.index("rotate")
        theta = torch.where(is_rotate.view(-1, 1, 1), rotate, scale)
    else:
        theta = scale
    # align_corners=False: the PyTorch default the reference's unqualified affine_grid/grid_sample calls get.
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)


_TRANSFORMS = {
    "color": lambda x, p: _color(x, p),
    "crop": lambda x, p: _crop(x, p),
    "cutout": lambda x, p: _cutout(x, p),
    "flip": _flip,
    "scale": lambda x, p: _affine(x, p, "scale"),
    "rotate": lambda x, p: _affine(x, p, "rotate"),
}
