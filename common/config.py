"""Typed experiment configuration: YAML files under `configs/` plus `key.sub=value` overrides.

Every section is a pydantic model with unknown keys forbidden and strict types, so a typo or a
wrong type never falls back to a default. `load_config` turns any validation failure into a
`ConfigError` whose message is one line per problem, naming the dotted key and the allowed range.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.methods import METHODS, MethodName

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Training images per class, and classes, of the datasets known before loading them (an ImageFolder is checked
# once loaded: common.holdings.load_experiment_data).
KNOWN_TRAIN_PER_CLASS = {"cifar10": 5000}
KNOWN_NUM_CLASSES = {"cifar10": 10, "tiny": 10}
SEED_LIMIT = 2**32  # numpy's seeds: 0 <= seed < 2**32
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # a run/sweep name: one safe folder-name component
# A number as people write it; YAML 1.1 (PyYAML) reads e.g. 1e-3 or 1E5 as a string.
_NUMBER_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A configuration problem; str() is one line per problem, each naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_written_as_text(cls, data: Any) -> Any:
        """A float key given a string that spells a number (`1e-3` in YAML 1.1) takes that number."""
        if not isinstance(data, dict):
            return data
        return {
            key: float(value)
            if isinstance(value, str) and key in cls.model_fields and _takes_float(cls.model_fields[key].annotation)
            and _NUMBER_TEXT.fullmatch(value.strip())
            else value
            for key, value in data.items()
        }


def _takes_float(annotation: Any) -> bool:
    """Whether a field's type admits a float (directly, or as an Annotated branch of a union)."""
    branches = [annotation, *get_args(annotation)]
    return any(b is float or (get_origin(b) is Annotated and get_args(b)[0] is float) for b in branches)


class DataConfig(_Section):
    name: Literal["cifar10", "imagefolder", "tiny"] = "cifar10"
    path: str | None = None  # then $FEDDISTILL_DATA, then ~/.cache/feddistill/data
    download: bool = False  # torchvision CIFAR10(download=True) when the files are missing
    train_per_class: int | None = Field(None, ge=1)  # a reduced, seeded slice of the training set
    test_per_class: int | None = Field(None, ge=1)
    tiny_per_class: int = Field(20, ge=1, le=1000)  # only for name=tiny (generated, unit tests)


class SplitConfig(_Section):
    pipc: int | None = Field(50, ge=0)  # public (server-side, safe) images per class
    public_ratio: float | None = Field(None, gt=0.0, lt=1.0)  # alternative to pipc
    num_clients: int = Field(3, ge=1, le=1000)
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    alpha: float = Field(0.5, gt=0.0)  # Dirichlet concentration
    classes_per_client: int = Field(2, ge=1)  # for partition=shards
    min_partition_size: int = Field(1, ge=0)  # Dirichlet resamples until every client has this many
    client_holdout: float = Field(0.1, ge=0.0, lt=1.0)  # slice of each shard for local evaluation
    # Images per class that neither the server nor any client holds: validation data for choosing hyperparameters.
    validation_per_class: int = Field(0, ge=0)
    # The seed of the holdings and the dataset slice (common/holdings.py); defaults to the experiment seed.
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    # Nested public subsets for the split-ratio benchmark: the private pool and the validation slice are those of
    # pipc=private_pipc, whatever pipc is, so one received model serves every pipc; the public subset is the first
    # pipc images per class of a fixed order over that split's public draw, then over its validation slice
    # (common/holdings.py). null: the private pool is the complement of pipc's own draw.
    private_pipc: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_public_size(self) -> SplitConfig:
        if self.public_ratio is not None and self.pipc is not None:
            raise ValueError("split.pipc and split.public_ratio are exclusive: set one, the other to null")
        if self.public_ratio is None and self.pipc is None:
            raise ValueError("split.pipc: set pipc (>= 0) or public_ratio (0 < r < 1)")
        if self.private_pipc is not None:
            if self.pipc is None:
                raise ValueError("split.private_pipc: nests public subsets by pipc; set pipc, not public_ratio")
            if self.pipc > self.private_pipc + self.validation_per_class:
                raise ValueError(
                    f"split.pipc={self.pipc}: with private_pipc={self.private_pipc} it must be <= private_pipc + "
                    f"validation_per_class ({self.private_pipc + self.validation_per_class}): the images beyond "
                    "private_pipc come from the validation slice"
                )
        return self


class ModelConfig(_Section):
    # convnet: ConvNet-3 and its width/depth/norm variants (the edge model, the DM embedder, the evaluation net);
    # resnet18: torchvision's ResNet-18 for small images, for cross-architecture evaluation only.
    arch: Literal["convnet", "resnet18"] = "convnet"
    width: int = Field(128, ge=1, le=4096)
    depth: int = Field(3, ge=1, le=5)
    norm: Literal["instancenorm", "batchnorm", "none"] = "instancenorm"


class FederationConfig(_Section):
    rounds: int = Field(3, ge=1)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    # Usable replies a round needs, and connected nodes to wait for before it starts; null = a majority of
    # split.num_clients (num_clients // 2 + 1; with krum at least 2 * krum_malicious + 3), so that one bad or
    # dead client of three does not stop the run. Set it to split.num_clients to require every client.
    min_clients: int | None = Field(None, ge=1)
    round_timeout: float = Field(3600.0, gt=0.0)  # seconds a round waits for replies before going on without them
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.01, gt=0.0, le=10.0)
    lr_decay: float = Field(1.0, gt=0.0, le=1.0)  # lr of round r = lr * lr_decay ** (r - 1)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    eval_batch_size: int = Field(500, ge=1)
    client_num_cpus: float = Field(1.0, gt=0.0)
    client_num_gpus: float = Field(0.0, ge=0.0, le=1.0)
    # Update guard (server/update_guard.py): with >= 3 replies, reject an update whose norm ||w_client - w_global||
    # exceeds this multiple of the round's median update norm.
    max_update_norm_ratio: float = Field(10.0, gt=1.0)
    # ... and, with any number of replies, one whose norm exceeds this multiple of ||w_global|| (honest updates
    # measured at most 1.9x, at lr 0.2 and 10 local epochs from a fresh model; 0.1x at the quickstart settings).
    max_update_global_ratio: float = Field(3.0, gt=0.0)
    # ... and, with >= 3 replies, one whose cosine similarity with the round's coordinate-wise median update, or with
    # the previous round's aggregate step, is below this: a reversed (sign-flipped) update scores below 0
    # (docs/benchmarks.md, "Poisoning"); -1 turns both off.
    min_update_cosine: float = Field(0.0, ge=-1.0, lt=1.0)
    # FedAvg without DP: scale every kept update whose norm exceeds the round's (lower) median update norm down to
    # it before averaging, so that no reply weighs more than a typical one (with 2 replies: the smaller norm).
    clip_to_median: bool = True
    aggregator: Literal["fedavg", "fedmedian", "fedtrimmedavg", "krum"] = "fedavg"
    trim_beta: float = Field(0.2, ge=0.0, lt=0.5)  # fedtrimmedavg: fraction cut at each end per coordinate
    krum_malicious: int = Field(0, ge=0)  # krum: the number of malicious clients it tolerates
    # Central DP with client-side fixed clipping (Flower's fixedclipping_mod + DP wrapper); 0 = off.
    dp_noise_multiplier: float = Field(0.0, ge=0.0)
    dp_clipping_norm: float | None = Field(None, gt=0.0)
    dp_delta: float = Field(1e-5, gt=0.0, lt=1.0)  # the delta at which epsilon is reported


class DistillConfig(_Section):
    enabled: bool = False  # run distillation on the server after the last federated round
    method: MethodName = "dm+dkkt"
    # Methods also run after federation, for comparison in the run's summary.md (e.g. [random, dm]).
    baselines: list[MethodName] = Field(default_factory=list)
    ipc: int = Field(10, ge=1)
    # real: random public images; noise: N(0, 1); lambda: the top-ipc public images of each class by their fitted
    # DKKT multiplier (needs the received model and lambda_fit_steps >= 1; DSV Table 1's selection).
    init: Literal["real", "noise", "lambda"] = "real"
    iterations: int = Field(1000, ge=0)
    lr_img: float = Field(1.0, gt=0.0)
    momentum_img: float = Field(0.5, ge=0.0, lt=1.0)
    batch_real: int = Field(256, ge=1)
    dsa_strategy: str = "color_crop_cutout_flip_scale_rotate"
    # Deep KKT (DSV) terms; see docs/method.md for which of these are our choices.
    # w_kkt, the weight of L_DKKT: "auto" holds its image gradient at dkkt_ratio x DM's (server/distill/balance.py),
    # or a fixed number. dkkt_min_step: the RMS pixel step per iteration that sets the scale where DM's gradient vanishes.
    dkkt_weight: Annotated[float, Field(ge=0.0)] | Literal["auto"] = "auto"
    dkkt_ratio: float = Field(1.0, gt=0.0)  # chosen on validation data: docs/method.md, our choice 5
    dkkt_min_step: float = Field(0.003, gt=0.0)
    # 0: the DKKT term on every synthetic image each iteration; m > 0: on m random ones (lambda scaled by n/m), a
    # CPU saving whose accuracy effect docs/results/cpu-pipc50 states.
    dkkt_candidates: int = Field(0, ge=0)
    # A DM-then-DKKT schedule (dm+dkkt only): the first dkkt_from x iterations run DM alone, then the DKKT term joins
    # (lambda fitted to the images of that moment when lambda_fit_steps >= 1). 0: DKKT from the first iteration.
    dkkt_from: float = Field(0.0, ge=0.0, lt=1.0)
    # The parts of L_DKKT, each weightable on its own (server/distill/dkkt.py, dkkt_parts): in each view the
    # stationarity term (stat_weight) and the primal cross-entropy (primal_weight); the views are the synthetic images
    # themselves (plain_weight) and an augmented copy (aug_weight).
    stat_weight: float = Field(1.0, ge=0.0)
    primal_weight: float = Field(2e-3, ge=0.0)  # beta1 (DSV CIFAR setting)
    plain_weight: float = Field(1.0, ge=0.0)
    aug_weight: float = Field(5.0, ge=0.0)  # eta: weight of the KKT terms on an augmented view
    tv_weight: float = Field(0.0, ge=0.0)  # beta2, off for CIFAR as in DSV
    norm_weight: float = Field(0.0, ge=0.0)  # beta3, off for CIFAR as in DSV
    lambda_init: float = Field(0.5, ge=0.0)
    lambda_lr: float = Field(1e-2, gt=0.0)
    # >= 1: before the first iteration, fit lambda to theta* from 0 with the images frozen, for this many Adam steps
    # at lambda_lr (server/distill/lambdas.py); 0: start every lambda at lambda_init.
    lambda_fit_steps: int = Field(300, ge=0)
    num_seeds: int = Field(1, ge=1)
    # torch.compile the DM embedder, and the backward of theta*'s instance norms in the DKKT term (inductor fuses their
    # double backward): the same losses to float rounding, faster per step after one-off compiles of seconds
    # (docs/benchmarks.md, "Distillation modes").
    compile: bool = False
    # bf16: the DM embedder and the DKKT term under bfloat16 autocast (images, lambda, weights and the optimisers stay
    # fp32): another estimator, whose accuracy difference to fp32 docs/benchmarks.md measures; fp32 is the reference.
    # auto: bf16 on a CPU with bf16 units, fp32 elsewhere (common.runtime.resolve_precision; result.json records which).
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    checkpoint_every: int = Field(500, ge=1)
    # Progress metrics are read back every log_every iterations: each read is a device sync that would
    # otherwise stall the GPU pipeline once per iteration.
    log_every: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _dkkt_not_empty(self) -> DistillConfig:
        if any(METHODS[m].uses_dkkt for m in (self.method, *self.baselines)) and not (self.tv_weight or self.norm_weight):
            if not (self.stat_weight or self.primal_weight):
                raise ValueError("distill.stat_weight and distill.primal_weight are both 0: L_DKKT would be 0")
            if not (self.plain_weight or self.aug_weight):
                raise ValueError("distill.plain_weight and distill.aug_weight are both 0: L_DKKT would be 0")
        return self


class EvaluationConfig(_Section):
    epochs: int = Field(1000, ge=1)
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    batch_size: int = Field(256, ge=1)
    num_nets: int = Field(5, ge=1)
    dsa: bool = True
    # torch.compile the evaluation net's passes (training and test): the same protocol to float rounding, faster per
    # net after a one-off compile per process and batch shape (docs/benchmarks.md, "Evaluation modes").
    compile: bool = False
    # bf16: the net's passes under bfloat16 autocast (weights, optimiser and loss stay fp32): another protocol, with
    # its accuracy difference to fp32 measured in docs/benchmarks.md; fp32 is the reference protocol.
    precision: Literal["fp32", "bf16"] = "fp32"


class ExperimentConfig(_Section):
    name: str = "experiment"  # names the run folder: letters, digits, '.', '_', '+', '-'
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    model: ModelConfig = ModelConfig()
    federation: FederationConfig = FederationConfig()
    distill: DistillConfig = DistillConfig()
    evaluation: EvaluationConfig = EvaluationConfig()

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not NAME_PATTERN.fullmatch(value):
            raise ValueError(
                f"name={value[:60]!r}: must be 1-100 letters, digits, '.', '_', '+' or '-', starting with a letter or "
                "digit (it names the run folder; no '/' or '..')"
            )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        if self.model.arch != "convnet":
            raise ValueError(
                f"model.arch={self.model.arch!r}: the edge model and the DM embedder are ConvNets; other architectures "
                "are for evaluation (feddistill evaluate PACK --arch resnet18)"
            )
        num_classes = KNOWN_NUM_CLASSES.get(self.data.name)
        check_against_dataset(self, train_per_class_of(self), num_classes)
        if num_classes is not None:
            check_classes(self, num_classes)
        if self.federation.min_clients is not None and self.federation.min_clients > self.split.num_clients:
            raise ValueError(
                f"federation.min_clients={self.federation.min_clients}: must be <= split.num_clients={self.split.num_clients}"
            )
        _check_robust_and_dp(self)
        return self


def check_partition_id(partition_id: int, num_clients: int, source: str = "partition-id") -> None:
    """ValueError naming `source` unless edge client `partition_id` is one of split.num_clients."""
    if not 0 <= partition_id < num_clients:
        raise ValueError(f"{source}={partition_id}: must be in 0..{num_clients - 1} (split.num_clients)")


def check_classes(cfg: ExperimentConfig, num_classes: int) -> None:
    """Checks that need the number of classes; raises ValueError naming the key."""
    split = cfg.split
    if split.partition == "shards" and split.num_clients + split.classes_per_client - 1 < num_classes:
        # Client p holds classes p .. p+k-1 (mod C); fewer windows than classes would leave private images unassigned.
        raise ValueError(
            f"split.classes_per_client: num_clients + classes_per_client - 1 must be >= the number of classes "
            f"({num_classes}) so that every private image lands in a shard; got {split.num_clients} + "
            f"{split.classes_per_client} - 1"
        )


def _check_robust_and_dp(cfg: ExperimentConfig) -> None:
    """Aggregator and DP combinations that cannot work; raises ValueError naming the key."""
    fed = cfg.federation
    if fed.aggregator == "krum" and min_clients_of(cfg) < 2 * fed.krum_malicious + 3:
        raise ValueError(
            f"federation.aggregator='krum' with krum_malicious={fed.krum_malicious} needs at least "
            f"{2 * fed.krum_malicious + 3} replies per round (2 * krum_malicious + 3); federation.min_clients / "
            f"split.num_clients give {min_clients_of(cfg)}"
        )
    if not dp_enabled(cfg):
        if fed.dp_clipping_norm is not None:
            raise ValueError("federation.dp_clipping_norm: set federation.dp_noise_multiplier > 0 too (clipping alone is not DP)")
        return
    if fed.dp_clipping_norm is None:
        raise ValueError(f"federation.dp_clipping_norm: required when federation.dp_noise_multiplier={fed.dp_noise_multiplier}")
    if fed.aggregator != "fedavg":
        raise ValueError(f"federation.aggregator={fed.aggregator!r}: DP noise is calibrated for the mean; use fedavg with DP")
    if cfg.model.norm == "batchnorm":
        raise ValueError("model.norm='batchnorm': DP clipping and noise cannot apply to integer BatchNorm counters")


def min_clients_of(cfg: ExperimentConfig) -> int:
    """federation.min_clients, defaulting to a majority of the clients (at least what krum needs, at most all)."""
    fed = cfg.federation
    if fed.min_clients is not None:
        return fed.min_clients
    needed = 2 * fed.krum_malicious + 3 if fed.aggregator == "krum" else 1
    return min(cfg.split.num_clients, max(cfg.split.num_clients // 2 + 1, needed))


def dp_enabled(cfg: ExperimentConfig) -> bool:
    """Whether edge updates are clipped and the aggregate noised (federation.dp_noise_multiplier > 0)."""
    return cfg.federation.dp_noise_multiplier > 0


def sampled_per_round(cfg: ExperimentConfig) -> int:
    """Clients sampled for training each round, as Flower's FedAvg samples them (all online)."""
    return max(int(cfg.split.num_clients * cfg.federation.fraction_train), min_clients_of(cfg))


def train_per_class_of(cfg: ExperimentConfig) -> int | None:
    """Training images per class, when known without loading the data."""
    known = cfg.data.tiny_per_class if cfg.data.name == "tiny" else KNOWN_TRAIN_PER_CLASS.get(cfg.data.name)
    if cfg.data.train_per_class is not None:
        return min(cfg.data.train_per_class, known) if known else cfg.data.train_per_class
    return known


def public_per_class(split: SplitConfig, train_per_class: int) -> int:
    """pipc, or the public ratio turned into images per class (at least 1)."""
    if split.pipc is not None:
        return split.pipc
    return max(1, round(split.public_ratio * train_per_class))


def check_against_dataset(cfg: ExperimentConfig, train_per_class: int | None, num_classes: int | None) -> None:
    """Checks that need the number of training images per class (and of classes, when known); raises ValueError
    naming the key."""
    if train_per_class is None:
        return
    if cfg.data.train_per_class is not None and cfg.data.train_per_class > train_per_class:
        raise ValueError(f"data.train_per_class={cfg.data.train_per_class}: must be <= {train_per_class} (images per class)")
    pipc = public_per_class(cfg.split, train_per_class)
    drawn = pipc if cfg.split.private_pipc is None else cfg.split.private_pipc  # the draw the private pool excludes
    if drawn > train_per_class:
        key = "pipc" if cfg.split.private_pipc is None else "private_pipc"
        raise ValueError(f"split.{key}={drawn}: must be between 0 and {train_per_class} (training images per class)")
    if drawn + cfg.split.validation_per_class > train_per_class:
        raise ValueError(
            f"split.validation_per_class={cfg.split.validation_per_class}: pipc + validation_per_class must be <= "
            f"{train_per_class} (training images per class)"
        )
    private_total = (train_per_class - drawn - cfg.split.validation_per_class) * (num_classes or 0)  # 0: unknown
    if 0 < private_total < cfg.split.num_clients:  # or 0 when all are public (distillation only)
        raise ValueError(
            f"split.num_clients={cfg.split.num_clients}: must be <= {private_total} (private images left after pipc={pipc})"
        )
    for method in dict.fromkeys([cfg.distill.method, *cfg.distill.baselines]):
        key = "distill.method" if method == cfg.distill.method else "distill.baselines"
        if cfg.distill.init == "lambda" and cfg.distill.lambda_fit_steps < 1:
            raise ValueError("distill.init='lambda': ranks public images by fitted multipliers; "
                             "set distill.lambda_fit_steps >= 1")
        if METHODS[method].needs_public(cfg.distill.init) and pipc == 0:
            raise ValueError(
                f"split.pipc=0: {key}={method!r} with init={cfg.distill.init!r} needs public images; "
                "use pipc >= 1 or method=dsv with init=noise"
            )
        if cfg.distill.ipc > pipc and (cfg.distill.init != "noise" or not METHODS[method].optimises):
            raise ValueError(
                f"distill.ipc={cfg.distill.ipc}: must be <= split.pipc={pipc} with init=real "
                f"(or method=random, here {key}={method!r}); use init=noise or a larger pipc"
            )


_UNION_TAG = re.compile(r"constrained-\w+|literal\[.*\]|int|float|str|bool|none")


def _format_error(err: ValidationError) -> str:
    lines, seen = [], set()
    for e in err.errors():
        # A union (e.g. dkkt_weight: a number or "auto") reports one error per branch, tagged in the location:
        # name the key once, with the first branch's message.
        key = ".".join(str(p) for p in e["loc"] if not _UNION_TAG.fullmatch(str(p)))
        if key in seen:
            continue
        seen.add(key)
        if e["type"] == "extra_forbidden":
            parent_keys = _allowed_keys(e["loc"][:-1])
            guess = difflib.get_close_matches(str(e["loc"][-1]), parent_keys, n=1)
            hint = f"; did you mean {guess[0]!r}?" if guess else ""
            lines.append(f"{key}: unknown key (allowed: {', '.join(parent_keys)}){hint}")
        elif e["type"] == "value_error":
            lines.append(str(e["ctx"]["error"]))
        else:
            given = e.get("input")
            shown = "" if isinstance(given, (dict, list)) else f"={_shown_input(given)}"
            lines.append(f"{key}{shown}: {e['msg']}")
    return "\n".join(lines)


def _shown_input(value: Any) -> str:
    """A given value for an error line: at most ~60 characters (a 400-digit number is given by its length)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"(an integer of {len(str(abs(value)))} digits)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _allowed_keys(loc: Iterable[Any]) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["federation.rounds=5", "data.path=/x"]` -> {"federation.rounds": 5, "data.path": "/x"} (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key.strip()}: {raw[:60]!r} is not a YAML value "
                              f"({' '.join(str(err).split())})") from None
        except RecursionError:
            raise ConfigError(f"override {key.strip()}: nested too deeply") from None
        except ValueError:  # int() of a number beyond Python's 4300-digit limit
            raise ConfigError(f"override {key.strip()}: an integer of {len(raw.strip())} characters "
                              "(not a usable value)") from None
    return out


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Sets dotted keys in a nested dict (a copy); unknown keys are caught later by validation."""
    merged = _deep_copy(raw)
    for dotted, value in overrides.items():
        node = merged
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{dotted}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return merged


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def resolve_config_path(name_or_path: str | Path, directory: Path = CONFIG_DIR) -> Path:
    """A YAML file, or the name of one under `directory` (configs/). A value with a '/' or ending in
    .yaml/.yml is a path and must be a file: it never falls back to the bundled config of the same name."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if "/" in text or path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise ConfigError(f"config {text!r}: no such file")
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "a device, pipe or socket"
            raise ConfigError(f"config {text!r}: not a file ({kind}); give a YAML file")
        return path
    candidate = directory / f"{text}.yaml"
    if candidate.is_file():
        return candidate
    available = ", ".join(sorted(p.stem for p in directory.glob("*.yaml")))
    raise ConfigError(
        f"config {text!r}: no config of that name (available: {available}); a file path needs a '/' or a .yaml suffix"
    )


def build_config(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Validates a nested dict (plus dotted overrides) into an ExperimentConfig, or raises ConfigError."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: the top level must be a mapping of sections, got {type(raw).__name__}")
    if _depth(raw) > MAX_DEPTH:
        raise ConfigError("config: nested too deeply (a config has two levels: section.key)")
    try:
        merged = apply_overrides(dict(raw), overrides or {})
        return ExperimentConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
    except RecursionError:
        raise ConfigError("config: nested too deeply (a config has two levels: section.key)") from None


MAX_DEPTH = 8  # section -> key -> a value that may be a list of lists: far below this; the check needs no recursion


def _depth(value: Any) -> int:
    """How deeply mappings and lists nest in `value` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, Mapping):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
        else:
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
        if deepest > MAX_DEPTH:
            break
    return deepest


def load_config(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Loads a YAML config by path or name and applies dotted overrides."""
    path = resolve_config_path(name_or_path)
    try:
        text = path.read_text()
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path}: not valid YAML ({' '.join(str(err).split())})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config {path}: cannot be read ({type(err).__name__}: {err})") from None
    except RecursionError:
        raise ConfigError(f"config {path}: nested too deeply (a config has two levels: section.key)") from None
    except ValueError:  # int() of a number beyond Python's 4300-digit limit
        raise ConfigError(f"config {path}: {_huge_number(text)}") from None
    return build_config(raw, overrides)


def _huge_number(text: str) -> str:
    """Where a YAML text holds an integer too long to read: its line and key."""
    for number, line in enumerate(text.splitlines(), start=1):
        match = re.search(r"([\w.-]+)\s*:\s*[-+]?(\d{1000,})", line)
        if match:
            return f"line {number}: {match.group(1)!r} is an integer of {len(match.group(2))} digits (not a usable value)"
    return "holds an integer too long to read (over 4300 digits)"


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


# Keys that do not change what a distillation seed computes: where and under which name it is written, how many seeds
# one call runs, how often it checkpoints and logs. Resuming ignores them (server/distill/artifacts.py).
RESUME_NEUTRAL = frozenset({"name", "output_dir", "distill.num_seeds", "distill.checkpoint_every", "distill.log_every"})


def config_hash(config: Mapping[str, Any], ignore: Collection[str] = RESUME_NEUTRAL) -> str:
    """sha256 of a resolved config (config_to_dict) without the dotted keys in `ignore`."""
    kept = {
        section: {k: v for k, v in values.items() if f"{section}.{k}" not in ignore} if isinstance(values, dict) else values
        for section, values in config.items() if section not in ignore
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Collection[str] = ()) -> list[str]:
    """'key: old -> new' for every dotted key whose value in a recorded config `old` differs from `new`; a key `old`
    lacks (added since) counts as its default, which keeps the old behaviour; a nested split at pipc = private_pipc is
    the plain split of that pipc; distill.precision `auto` matches a recorded fp32 or bf16 (what auto runs, by the
    machine), and distill.compile matches either way (the same losses to float rounding); the accuracy of each agrees
    with eager fp32 (docs/benchmarks.md, "Distillation modes"). Keys in `ignore` are not compared."""
    defaults = config_to_dict(ExperimentConfig())
    old, new = _plain_split(old), _plain_split(new)
    differ = []
    for section, values in new.items():
        if not isinstance(values, dict):
            if section not in ignore and old.get(section, values) != values:
                differ.append(f"{section}: {_shown(old.get(section))} -> {_shown(values)}")
            continue
        recorded = old.get(section, {})
        recorded = recorded if isinstance(recorded, dict) else {}
        for key, value in values.items():
            was = recorded.get(key, defaults.get(section, {}).get(key, value))
            if f"{section}.{key}" not in ignore and was != value and not _same_protocol(f"{section}.{key}", was, value):
                differ.append(f"{section}.{key}: {_shown(was)} -> {_shown(value)}")
    return differ


def _same_protocol(key: str, was: Any, value: Any) -> bool:
    """Two values of a distillation mode that run the same protocol: distill.compile either way, distill.precision
    `auto` against a concrete fp32 / bf16 either way round."""
    if key == "distill.compile":
        return True
    return key == "distill.precision" and "auto" in (was, value) and {was, value} <= {"auto", "fp32", "bf16"}


def _plain_split(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """A recorded config with a nested split at pipc = private_pipc written as the plain split it equals."""
    split = config.get("split", {})
    if isinstance(split, dict) and split.get("private_pipc") is not None and split["private_pipc"] == split.get("pipc"):
        return {**config, "split": {**split, "private_pipc": None}}
    return config


def same_configuration(old: Mapping[str, Any], new: Mapping[str, Any], ignore: Collection[str] = ()) -> bool:
    """Whether a run recorded with config `old` ran what `new` runs (config_differences finds nothing)."""
    return not config_differences(old, new, ignore)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
