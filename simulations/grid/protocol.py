"""The evidence protocol's grid file: what it runs (configs/grids/<name>.yaml) and the cells that follows.

A protocol grid names an experiment config and its overrides, the scale per ipc, the table's variants x ipcs x pipcs
x seeds, the calibration grid of dkkt_ratio, the balance and DM-curve points, and the stages run by default. Its
cells keep the base config's split seed, so every cell distils from a public subset the received model never saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.config import CONFIG_DIR, ConfigError, ExperimentConfig, load_config, resolve_config_path
from common.methods import METHODS
from simulations.grid.cells import GridCell, cell_name, pinned_split

GRID_DIR = CONFIG_DIR / "grids"
STAGES = ("edge", "calibrate", "balance", "curve", "table", "report")
Stage = Literal["edge", "calibrate", "balance", "curve", "table", "report"]


@dataclass(frozen=True)
class Variant:
    """A row of the table: a method plus what it changes (e.g. init=lambda)."""

    name: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)


VARIANTS = {
    v.name: v
    for v in (
        Variant("random", "random"),
        Variant("dm", "dm"),
        Variant("dsv", "dsv"),
        Variant("dm+dkkt", "dm+dkkt"),
        Variant("random@lambda", "random", {"distill.init": "lambda"}),
        Variant("dm@lambda", "dm", {"distill.init": "lambda"}),
        Variant("dm+dkkt@lambda", "dm+dkkt", {"distill.init": "lambda"}),
        # The control for the step size: DM alone with its image step scaled by (1 + dkkt_ratio), the largest
        # step dm+dkkt can take (set per table in `table_cells`). If it matches dm+dkkt, DKKT adds only step.
        Variant("dm@step", "dm"),
        # Ablations of dm+dkkt: the DM-then-DKKT schedule (DM alone for the first half), without the augmented view
        # (the KKT terms on the synthetic images only), and the CPU savings undone
        # (DM's batch_real 256, i.e. every public image in each step at pipc <= 256; the DKKT term on every synthetic
        # image): what the savings cost.
        Variant("dm+dkkt@late", "dm+dkkt", {"distill.dkkt_from": 0.5}),
        Variant("dm+dkkt@noaug", "dm+dkkt", {"distill.aug_weight": 0.0}),
        Variant("dm@full", "dm", {"distill.batch_real": 256}),
        Variant("dm+dkkt@full", "dm+dkkt", {"distill.batch_real": 256, "distill.dkkt_candidates": 0}),
        # DM run to convergence: the iteration count DM's validation curve chose at that ipc (the curve stage; set per
        # table in `table_cells`), the baseline the headline gain is measured against.
        Variant("dm@conv", "dm"),
        # Which part of L_DKKT carries the gain: the primal cross-entropy alone, the stationarity term alone (both
        # views; the auto weight holds the DKKT share of the image gradient at dkkt_ratio either way).
        Variant("dm+primal", "dm+dkkt", {"distill.stat_weight": 0.0}),
        Variant("dm+stat", "dm+dkkt", {"distill.primal_weight": 0.0}),
    )
}


class Protocol(BaseModel):
    """What the evidence runs: the experiment config, the scale per ipc, the grids, the default stages."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["protocol"] = "protocol"
    name: str = ""  # the grid file's name (the preset), set by load_protocol
    config: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    per_ipc: dict[int, dict[str, Any]] = Field(default_factory=dict)  # ipc -> overrides at that ipc
    table_ipcs: tuple[int, ...]
    seeds: tuple[int, ...] = Field(min_length=1)
    variants: tuple[str, ...] = Field(min_length=1)
    single_seed_ipcs: tuple[int, ...] = ()  # ipcs run with the first seed only (the most expensive)
    single_seed_variants: tuple[str, ...] = ()
    calibration_ipcs: tuple[int, ...] = ()
    ratio_grid: tuple[float, ...] = ()
    balance_ipcs: tuple[int, ...] = ()
    balance_iterations: int = 30
    # The split-ratio axis: public images per class of the table's cells (empty: the config's pipc only), nested
    # (split.private_pipc) so that one received model serves them all.
    pipcs: tuple[int, ...] = ()
    private_pipc: int | None = None
    only_at: dict[str, tuple[int, ...]] = Field(default_factory=dict)  # variant -> the pipcs it runs at (default: all)
    # DM's validation curve (the curve stage): ipc -> iteration counts whose sets are evaluated, at each curve pipc.
    curve: dict[int, tuple[int, ...]] = Field(default_factory=dict)
    curve_pipcs: tuple[int, ...] = ()
    # A folder of another protocol's finished results whose matching pieces are taken instead of run again: the
    # received model (edge stage), calibration.json, and table cells of the same name and configuration.
    reuse: str | None = None
    # Folders of `feddistill audit` runs over this protocol's cells (their summary.csv rows, keyed by cell name, become
    # the table's leakage columns).
    audits: tuple[str, ...] = ()
    stages: tuple[Stage, ...] = STAGES  # what a run without --stages does
    resources: dict[str, float] = Field(default_factory=dict)  # per cell on Ray, e.g. {num_cpus: 1, num_gpus: 0.25}

    @field_validator("variants", "single_seed_variants")
    @classmethod
    def _known_variants(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
        return names

    def cell_overrides(self, ipc: int, extra: dict[str, Any]) -> dict[str, Any]:
        """The grid's overrides, its scale at `ipc`, then the caller's key=value overrides (which win)."""
        return {**self.overrides, **self.per_ipc.get(ipc, {}), **extra, "distill.ipc": ipc}


def grid_path(name_or_path: str | Path) -> Path:
    return resolve_config_path(name_or_path, GRID_DIR)


def read_grid(path: Path) -> dict[str, Any]:
    """A grid file's YAML mapping; one-line ConfigError when it cannot be read."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"grid {path}: cannot be read as YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"grid {path}: the top level must be a mapping")
    return raw


def validation_error(path: Path, err: ValidationError) -> ConfigError:
    lines = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    return ConfigError(f"grid {path.name}: " + "; ".join(lines))


def protocol_names() -> list[str]:
    """The protocol grids under configs/grids/ (the presets of `python -m simulations.evidence`)."""
    return sorted(p.stem for p in GRID_DIR.glob("*.yaml") if read_grid(p).get("kind") == "protocol")


def load_protocol(name_or_path: str | Path) -> Protocol:
    """A protocol grid by name (configs/grids/) or path; its name is the file's stem."""
    path = grid_path(name_or_path)
    try:
        return Protocol.model_validate({**read_grid(path), "name": path.stem})
    except ValidationError as err:
        raise validation_error(path, err) from None


def base_config(protocol: Protocol, extra: dict[str, Any]) -> ExperimentConfig:
    return load_config(protocol.config, {**protocol.overrides, **extra})


def cell_config(protocol: Protocol, extra: dict[str, Any], variant: Variant, ipc: int, seed: int,
                more: dict[str, Any] | None = None) -> ExperimentConfig:
    """The config of one cell; the split seed stays the base config's, so every cell shares the edge model's split."""
    return load_config(protocol.config, {
        **protocol.cell_overrides(ipc, extra), **variant.overrides, **(more or {}),
        "distill.method": variant.method, "distill.num_seeds": 1, "distill.enabled": False, "seed": seed,
        **pinned_split(base_config(protocol, extra)),
    })


def calibration_cells(protocol: Protocol, extra: dict[str, Any]) -> list[GridCell]:
    """dm and dm+dkkt at every ratio of the grid, at each calibration ipc, with the first seed."""
    seed = protocol.seeds[0]
    cells = []
    for ipc in protocol.calibration_ipcs:
        cells.append(GridCell(f"ipc{ipc}-dm-seed{seed}", cell_config(protocol, extra, VARIANTS["dm"], ipc, seed),
                              {"ipc": ipc, "method": "dm", "ratio": None, "seed": seed}))
        for ratio in protocol.ratio_grid:
            cfg = cell_config(protocol, extra, VARIANTS["dm+dkkt"], ipc, seed, {"distill.dkkt_ratio": ratio})
            cells.append(GridCell(f"ipc{ipc}-dm_dkkt-ratio{ratio:g}-seed{seed}", cfg,
                                  {"ipc": ipc, "method": "dm+dkkt", "ratio": ratio, "seed": seed}))
    return cells


FIRST_VARIANTS = ("random", "dm", "dm+dkkt", "dm@step")  # the paper's comparison and its control, every seed first


def runs_at(protocol: Protocol, name: str, pipc: int | None, ipc: int) -> bool:
    """Whether variant `name` has a cell at (pipc, ipc): ipc <= pipc (init=real), the variant's pipcs, and no `dm@conv`
    where ipc = pipc (DM's loss is 0 there: `dm`'s cell shows that its set stays random's)."""
    if pipc is None:
        return True
    return ipc <= pipc and pipc in protocol.only_at.get(name, (pipc,)) and not (name == "dm@conv" and ipc == pipc)


def table_cells(protocol: Protocol, extra: dict[str, Any], ratio: float, conv_iterations: dict[int, int] | None = None
                ) -> list[GridCell]:
    """Every (variant, ipc, pipc, seed) of the table with the calibrated ratio, in the order that answers the paper's
    question first: random, dm and dm+dkkt at every multi-seed ipc (in the grid's order), seed and pipc; then each
    other variant the same way, one variant after another; then the single-seed ipcs (the most expensive). A partial
    run is a complete comparison for the columns it has. `conv_iterations` (ipc -> DM's converged iteration count,
    from the curve stage) is needed for `dm@conv`."""
    multi = [ipc for ipc in protocol.table_ipcs if ipc not in protocol.single_seed_ipcs]
    pipcs = protocol.pipcs or (None,)
    first = [n for n in protocol.variants if n in FIRST_VARIANTS]
    tiers = [first] + [[n] for n in protocol.variants if n not in FIRST_VARIANTS]
    order = [(ipc, seed, pipc, name) for tier in tiers for ipc in multi for seed in protocol.seeds for pipc in pipcs
             for name in tier]
    order += [(ipc, protocol.seeds[0], pipc, name) for ipc in protocol.single_seed_ipcs for pipc in pipcs
              for name in protocol.single_seed_variants]
    cells = []
    for ipc, seed, pipc, name in order:
        if not runs_at(protocol, name, pipc, ipc):
            continue
        more = {"distill.dkkt_ratio": ratio, **({"split.pipc": pipc} if pipc is not None else {})}
        cfg = cell_config(protocol, extra, VARIANTS[name], ipc, seed, more)
        if name == "dm@step":
            step = cfg.distill.lr_img * (1 + ratio)
            cfg = cell_config(protocol, extra, VARIANTS[name], ipc, seed, {**more, "distill.lr_img": step})
        if name == "dm@conv":
            if not conv_iterations or ipc not in conv_iterations:
                continue  # the curve stage has not chosen this ipc's count yet
            cfg = cell_config(protocol, extra, VARIANTS[name], ipc, seed, {**more, "distill.iterations": conv_iterations[ipc]})
        cells.append(GridCell(cell_name(cfg.split.pipc, ipc, name, seed), cfg,
                              {"pipc": cfg.split.pipc, "ipc": ipc, "method": name, "seed": seed}))
    return cells


@dataclass(frozen=True)
class TableFilter:
    """Which of the table's cells a run takes (empty: all): by variant, ipc, pipc and seed."""

    variants: tuple[str, ...] = ()
    ipcs: tuple[int, ...] = ()
    pipcs: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()

    def keeps(self, columns: dict[str, Any]) -> bool:
        wanted = {"method": self.variants, "ipc": self.ipcs, "pipc": self.pipcs, "seed": self.seeds}
        return all(not values or columns[key] in values for key, values in wanted.items())


# Split keys that decide only how the private pool is partitioned over clients (never the public subset, the
# validation slice or the dataset slice): only the received model depends on them.
PRIVATE_ONLY = ("num_clients", "partition", "alpha", "classes_per_client", "min_partition_size", "client_holdout")


def model_independent_keys(cfg: ExperimentConfig) -> set[str]:
    """The keys a cell of `cfg` does not depend on: what only the received model depends on (the federation and how
    the private pool is partitioned) when its method never reads the model; none otherwise."""
    if METHODS[cfg.distill.method].needs_model(cfg.distill.init):
        return set()
    return {f"split.{k}" for k in PRIVATE_ONLY} | {f"federation.{k}" for k in type(cfg.federation).model_fields}
