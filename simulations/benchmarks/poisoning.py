"""Measures the sign-flip poisoning attack against the federation's aggregation rules (docs/reliability.md, "Poisoning").

One client in four sends its own update reversed and scaled x5, or one client in three x9.5 (both under
federation.max_update_norm_ratio = 10, so the norm check alone lets them through). Each case is a real Flower
simulation (`simulations.commands.simulate.simulate`, Ray) of the quickstart federation on the real archive, without
distillation; the test accuracy of the global model after the same rounds is compared across:

  honest      no attacker, the default aggregation
  default     the attack, the default aggregation (FedAvg behind the update guard's direction check and median clip)
  undefended  the attack, FedAvg behind the guard as it was before (federation.min_update_cosine=-1, clip_to_median=false)
  fedmedian   the attack, federation.aggregator=fedmedian

plus honest runs of the old rule, and a 10-client honest federation under both rules, to show the defence costs the
honest federation nothing beyond noise.

  nice -n 10 python -m simulations.poisoning --out docs/results/poisoning.json

Each case runs in its own process (one Ray instance each); the attacker's settings reach the Ray workers through
$FEDDISTILL_POISON ("partition,factor").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from edge_client.client_app import evaluate_reply, train_reply

POISON_ENV = "FEDDISTILL_POISON"
UNDEFENDED = {"federation.min_update_cosine": -1.0, "federation.clip_to_median": False}
BASE = {  # the quickstart federation, narrower (CPU-sized), a smaller private slice, a larger test slice, no distillation
    "model.width": 32, "data.train_per_class": 200, "data.test_per_class": 300, "distill.enabled": False,
    "federation.rounds": 3, "federation.round_timeout": 600.0,  # a round whose Ray workers died fails (and is retried)
}
# name -> (clients, attacker factor or None, overrides)
CASES: dict[str, tuple[int, float | None, dict[str, Any]]] = {
    "4-honest": (4, None, {}),
    "4-attack-default": (4, 5.0, {}),
    "4-attack-undefended": (4, 5.0, UNDEFENDED),
    "4-attack-fedmedian": (4, 5.0, {"federation.aggregator": "fedmedian"}),
    "3-honest": (3, None, {}),
    "3-honest-undefended": (3, None, UNDEFENDED),
    "3-attack-default": (3, 9.5, {}),
    "3-attack-undefended": (3, 9.5, UNDEFENDED),
    "3-attack-fedmedian": (3, 9.5, {"federation.aggregator": "fedmedian"}),
    "10-honest": (10, None, {}),
    "10-honest-undefended": (10, None, UNDEFENDED),
}


def reversed_update(content: RecordDict, sent: ArrayRecord, factor: float) -> RecordDict:
    """The attack: the reply's update w - w_global replaced by -factor x (w - w_global) (floating-point arrays)."""
    forged = {}
    for name, array in content["arrays"].items():
        value, start = array.numpy(), sent[name].numpy()
        if value.dtype.kind == "f":
            value = (start - factor * (value.astype(np.float64) - start)).astype(value.dtype)
        forged[name] = Array(np.ascontiguousarray(value))
    content["arrays"] = ArrayRecord(forged)
    return content


def attacker() -> tuple[int, float] | None:
    """(partition id, factor) of the attacking client from $FEDDISTILL_POISON, None when unset."""
    text = os.environ.get(POISON_ENV, "")
    if not text:
        return None
    partition, factor = text.split(",")
    return int(partition), float(factor)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    content = train_reply(msg.content, context.node_config)
    attack = attacker()
    if attack is not None and int(context.node_config["partition-id"]) == attack[0]:
        content = reversed_update(content, msg.content["arrays"], attack[1])
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(content=evaluate_reply(msg.content, context.node_config), reply_to=msg)


def run_case(name: str, out_dir: Path) -> dict[str, Any]:
    """One case in this process (called in a child process by `main`): returns its record."""
    import ray.cloudpickle
    from rich.console import Console

    from common.config import load_config
    from simulations.commands.simulate import simulate

    clients, factor, overrides = CASES[name]
    cfg = load_config("quickstart", {**BASE, "name": f"poisoning-{name}", "split.num_clients": clients, **overrides})
    if factor is not None:
        os.environ[POISON_ENV] = f"{clients - 1},{factor}"  # the last client attacks
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get this ClientApp by value
    outcome = simulate(cfg, output_dir=out_dir, console=Console(quiet=True), client_app=app)
    return {
        "case": name, "clients": clients, "attack_factor": factor, "overrides": overrides, "base_overrides": BASE,
        "test_accuracy": [line["test_accuracy"] for line in outcome.rounds],
        "rejected": [line["rejected"] for line in outcome.rounds[1:]],
        "clipped": [line["clipped"] for line in outcome.rounds[1:]],
        "seconds": round(outcome.seconds, 1),
    }


def table(records: dict[str, dict[str, Any]]) -> str:
    """The Markdown table: final test accuracy per federation and rule, and the attack's cost."""
    def acc(name: str) -> str:
        r = records.get(name)
        return "-" if r is None else f"{100 * r['test_accuracy'][-1]:.1f}"

    lines = ["| federation | attack | honest (default) | honest (undefended) | default | undefended | fedmedian "
             "| default - honest |",
             "|---|---|---|---|---|---|---|---|"]
    for clients, attack in ((4, "1 of 4 reverses x5"), (3, "1 of 3 reverses x9.5"), (10, "none")):
        honest, attacked = records.get(f"{clients}-honest"), records.get(f"{clients}-attack-default")
        gap = f"{100 * (attacked['test_accuracy'][-1] - honest['test_accuracy'][-1]):+.1f}" if honest and attacked else "-"
        lines.append(f"| {clients} clients | {attack} | {acc(f'{clients}-honest')} | {acc(f'{clients}-honest-undefended')} | "
                     f"{acc(f'{clients}-attack-default')} | {acc(f'{clients}-attack-undefended')} | "
                     f"{acc(f'{clients}-attack-fedmedian')} | {gap} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results/poisoning.json", help="the JSON to write (cases already there are kept)")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--merge", nargs="*", default=[], metavar="JSON",
                        help="cases measured by another run of this script (e.g. in parallel) to add to --out")
    parser.add_argument("--run-case", default=None, help=argparse.SUPPRESS)  # the child process of one case
    parser.add_argument("--runs", default="runs/poisoning", help="folder for the cases' run folders")
    args = parser.parse_args(argv)
    if args.run_case:
        print(json.dumps(run_case(args.run_case, Path(args.runs))))
        return 0

    import torch

    from common.atomic import save_json
    from common.runtime import describe_machine, git_commit

    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.is_file() else {"cases": {}}
    for other in args.merge:
        merged = json.loads(Path(other).read_text())
        for name, record in merged["cases"].items():
            saved["cases"].setdefault(name, record if "measured" in record else
                                      {**record, "measured": {k: merged[k] for k in ("machine", "date", "commit")}})
        save_json(out, saved)
    for name in args.cases:
        if name in saved["cases"]:
            continue
        for attempt in range(2):  # once more when Ray fails under load (the same seeds: the same result)
            child = subprocess.run([sys.executable, "-m", "simulations.benchmarks.poisoning", "--run-case", name, "--runs",
                                    args.runs],
                                   capture_output=True, text=True, check=False)
            if child.returncode == 0:
                break
            print(f"{name}: attempt {attempt + 1} failed\n{child.stderr[-3000:]}", file=sys.stderr)
        else:
            return 1
        measured = {"machine": describe_machine(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"),
                    "commit": git_commit(), "command": f"python -m simulations.poisoning --out {args.out} --cases {name}"}
        saved["cases"][name] = {**json.loads(child.stdout.strip().splitlines()[-1]), "measured": measured}
        saved["base_overrides"] = BASE
        save_json(out, saved)
        record = saved["cases"][name]
        print(f"{name}: test accuracy {record['test_accuracy']}, rejected {record['rejected']}, "
              f"clipped {record['clipped']} ({record['seconds']} s)", flush=True)
    print(table(saved["cases"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
