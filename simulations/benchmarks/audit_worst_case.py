"""The leakage audit's worst case: a received model trained to (near) zero training loss on one tiny private shard.

    python -m simulations.benchmarks.audit_worst_case --config configs/audit_worst_case.yaml --out runs/worst-case

With one edge client FedAvg returns the client's own model, so the federation is its local training run round after
round: the server's initial model (`seed_everything(cfg.seed)`, as the federation starts), then per round the edge's
`train_local` with that round's settings (`common.protocol.round_config`: lr decayed, local epochs, batch size,
optimiser) and the ClientApp's round seed, **without the flip+crop augmentation** (the setting where reconstruction
from weights works best: the net is fitted to exactly these images). Writes OUT/received_model.pt and
OUT/metrics.json (per round: loss and accuracy on the clean training images, seconds; the final test accuracy).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from common.atomic import save_json, save_torch
from common.config import load_config, parse_overrides
from common.data import to_normalized_tensor
from common.holdings import decide_holdings, load_experiment_data
from common.models import model_from_config
from common.protocol import round_settings
from common.runtime import describe_machine, git_commit, seed_everything, utc_stamp
from common.training import evaluate, train_local


def train_received_model(config: str, overrides: dict, out: Path) -> dict:
    cfg = load_config(config, overrides)
    if cfg.split.num_clients != 1:
        raise ValueError(f"split.num_clients={cfg.split.num_clients}: the worst case has one edge client")
    dataset = load_experiment_data(cfg)
    train, _ = decide_holdings(cfg, dataset.train.labels).client(0)
    norm = dataset.normalization
    x, y = to_normalized_tensor(dataset.train.images[train], norm), torch.as_tensor(dataset.train.labels[train])
    test_x, test_y = to_normalized_tensor(dataset.test.images, norm), torch.as_tensor(dataset.test.labels)
    seed_everything(cfg.seed)
    model = model_from_config(cfg.model, dataset.num_classes, dataset.channels, dataset.image_size)
    rounds = []
    for server_round in range(1, cfg.federation.rounds + 1):
        settings = dataclasses.replace(round_settings(cfg, server_round), augment=False)
        result = train_local(model, x, y, settings, seed=cfg.seed * 1_000_003 + server_round * 1009)  # the ClientApp's
        loss, accuracy = evaluate(model, x, y)
        rounds.append({"round": server_round, "lr": settings.lr, "train_loss": loss, "train_accuracy": accuracy,
                       "last_epoch_loss": result.loss, "seconds": result.seconds})
        print(rounds[-1], flush=True)
    save_torch(out / "received_model.pt", model.state_dict())
    _, test_accuracy = evaluate(model, test_x, test_y)
    record = {"config": config, "overrides": overrides, "private_images": len(train), "rounds": rounds,
              "test_accuracy": test_accuracy,
              "augmentation": False, "machine": describe_machine(torch.device("cpu")), "commit": git_commit(),
              "date": utc_stamp()}
    save_json(out / "metrics.json", record)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/audit_worst_case.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    train_received_model(args.config, parse_overrides(args.overrides), Path(args.out))


if __name__ == "__main__":
    main()
