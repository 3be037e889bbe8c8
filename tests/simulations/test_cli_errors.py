"""Bad configs and bad files on the command line: exit code 2, one line naming the key or file, nothing written."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from common.config import build_config
from common.models import build_model
from server.federation import save_config
from server.resume import checkpoint_path
from simulations.cli import main

pytestmark = pytest.mark.reliability

TINY = ["data.name=tiny", "data.train_per_class=null", "data.test_per_class=null", "model.width=8", "split.pipc=2",
        "distill.ipc=1", "device=cpu"]

BAD_CONFIGS = [
    ("wrong type", ["federation.rounds=three"], "federation.rounds='three'"),
    ("out of range", ["federation.lr=0"], "federation.lr=0"),
    ("unknown key (typo)", ["federation.round=3"], "federation.round: unknown key"),
    ("unknown section", ["server.rounds=3"], "server: unknown key"),
    ("value not in the allowed set", ["federation.aggregator=mean"], "federation.aggregator='mean'"),
    ("override without '='", ["federation.rounds"], "override 'federation.rounds'"),
    ("a section set to a value", ["federation=3", "federation.rounds=2"], "federation.rounds: 'federation' is a value"),
    ("ipc > pipc with init=real", ["distill.ipc=5"], "distill.ipc=5: must be <= split.pipc=2"),
    ("more clients than private images", ["split.num_clients=500"], "split.num_clients=500: must be <= 180"),
    ("min_clients > num_clients", ["federation.min_clients=9"], "federation.min_clients=9"),
    ("pipc and public_ratio both set", ["split.public_ratio=0.1"], "split.pipc and split.public_ratio are exclusive"),
    ("DP noise without a clipping norm", ["federation.dp_noise_multiplier=1.0"], "federation.dp_clipping_norm: required"),
    ("DP clipping without noise", ["federation.dp_clipping_norm=1.0"], "federation.dp_clipping_norm: set"),
    ("DP with a robust aggregator", ["federation.dp_noise_multiplier=1.0", "federation.dp_clipping_norm=1.0",
                                     "federation.aggregator=fedmedian"], "federation.aggregator='fedmedian'"),
    ("DP with BatchNorm", ["federation.dp_noise_multiplier=1.0", "federation.dp_clipping_norm=1.0", "model.norm=batchnorm"],
     "model.norm='batchnorm'"),
    ("krum with too few clients", ["federation.aggregator=krum", "federation.krum_malicious=1"],
     "federation.aggregator='krum' with krum_malicious=1"),
    ("update-norm ratio <= 1", ["federation.max_update_norm_ratio=1"], "federation.max_update_norm_ratio=1"),
    ("DP delta out of range", ["federation.dp_delta=1.5"], "federation.dp_delta=1.5"),
    ("non-finite learning rate", ["distill.lr_img=.inf"], "distill.lr_img=inf: Input should be a finite number"),
    ("non-finite loss weight", ["distill.dkkt_weight=.nan"], "distill.dkkt_weight=nan: Input should be a finite number"),
    ("seed outside numpy's range", ["seed=-1"], "seed=-1: Input should be greater than or equal to 0"),
    ("a name that climbs out of output_dir", ["name=../../escape"], "name='../../escape': must be 1-100 letters"),
    ("an override that is not YAML", ["federation.lr=[1"], "override federation.lr: '[1' is not a YAML value"),
]


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.mark.parametrize("kind, overrides, words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_a_bad_config_stops_simulate_before_any_work_with_one_line_naming_the_key(kind, overrides, words, tmp_path, capsys,
                                                                                 reliability):
    out = tmp_path / "runs"
    code = main(["simulate", "--config", "quickstart", *TINY, *overrides, "--output-dir", str(out)])
    lines = error_lines(capsys)
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not out.exists()  # no run folder
    reliability("Bad configuration (feddistill simulate)", f"{kind}: `{' '.join(overrides)}`",
                f"exit 2, no run folder: `{lines[0]}`")


def truncated_copy(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: len(data) // 2])
    return target


def fake_run_folder(tmp_path: Path) -> Path:
    """A run folder that crashed after round 1: config, metrics lines and checkpoints for rounds 0 and 1."""
    cfg = build_config({"data": {"name": "tiny"}, "split": {"pipc": 2, "num_clients": 2}, "model": {"width": 8},
                        "distill": {"ipc": 1}, "federation": {"rounds": 3}, "device": "cpu"})
    run_dir = tmp_path / "run"
    save_config(cfg, run_dir)
    state = build_model(width=8).state_dict()
    for r in (0, 1):
        checkpoint_path(run_dir, r).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, checkpoint_path(run_dir, r))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "elapsed": 1.0}) + "\n" for r in (0, 1)))
    return run_dir


def test_a_truncated_round_checkpoint_given_to_resume_is_a_one_line_error(tmp_path, capsys, reliability):
    run_dir = fake_run_folder(tmp_path)
    good = checkpoint_path(run_dir, 1)
    truncated_copy(good, good)
    code = main(["simulate", "--resume", str(run_dir)])
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1 and "round_0001.pt: cannot be loaded as a weights-only torch file" in lines[0], lines
    assert not (run_dir / "received_model.pt").exists()
    reliability("Loading safety", "truncated checkpoints/round_0001.pt given to `simulate --resume`", f"exit 2: `{lines[0]}`")


def test_resume_without_a_run_folder_and_with_overrides_are_one_line_errors(tmp_path, capsys, reliability):
    assert main(["simulate", "--resume", str(tmp_path)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "no config.yaml" in lines[0]
    reliability("Crash and resume", "`simulate --resume` on a folder that is not a run folder", f"exit 2: `{lines[0]}`")
    assert main(["simulate", "--resume", str(fake_run_folder(tmp_path)), "federation.rounds=9"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "drop the overrides" in lines[0]
    reliability("Crash and resume", "`simulate --resume` with config overrides", f"exit 2: `{lines[0]}`")


class _Payload:
    """A pickle that would create a file when unpickled (what a tampered checkpoint could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fault", ["truncated", "pickle payload"])
def test_a_bad_model_file_given_to_distill_is_a_one_line_error(fault, tmp_path, capsys, reliability):
    model_file = tmp_path / "received_model.pt"
    marker = tmp_path / "pwned"
    if fault == "truncated":
        torch.save(build_model(width=8).state_dict(), model_file)
        truncated_copy(model_file, model_file)
    else:
        model_file.write_bytes(pickle.dumps({"features.0.weight": _Payload(marker)}))
    out = tmp_path / "out"
    code = main(["distill", "--config", "quickstart", *TINY, "distill.method=dm+dkkt", "--model", str(model_file),
                 "--out", str(out)])
    lines = error_lines(capsys)
    assert code == 2 and len(lines) == 1 and "received_model.pt: cannot be loaded as a weights-only torch file" in lines[0], lines
    assert not marker.exists() and not out.exists()
    reliability("Loading safety", f"{fault} file given to `distill --model`",
                f"exit 2, nothing executed or written: `{lines[0]}`")


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "a-file"
    path.write_text("not a folder")
    return path


USAGE_ERRORS = [
    ("simulate: device=cuda without CUDA", lambda t: ["simulate", *TINY, "device=cuda", "--output-dir", str(t / "runs")],
     "device=cuda: this machine has no CUDA device"),
    ("distill: device=cuda without CUDA", lambda t: ["distill", *TINY, "device=cuda", "distill.method=random",
                                                     "--out", str(t / "runs")], "device=cuda: this machine has no CUDA device"),
    ("--config naming a directory", lambda t: ["simulate", "--config", str(t), *TINY], "not a file (a directory)"),
    ("--config naming a missing file (a bundled config has its name)",
     lambda t: ["simulate", "--config", str(t / "quickstart.yaml"), *TINY], "quickstart.yaml': no such file"),
    ("--config naming a missing file whose name is console markup", lambda t: ["simulate", "--config", str(t / "[/x].yaml")],
     "[/x].yaml': no such file"),
    ("--output-dir naming a file", lambda t: ["simulate", *TINY, "--output-dir", str(_file(t))],
     "--output-dir='<tmp>/a-file': must be a folder, not a file"),
    ("output_dir naming a file", lambda t: ["simulate", *TINY, f"output_dir={_file(t)}"],
     "output_dir='<tmp>/a-file': must be a folder, not a file"),
    ("distill --out naming a file", lambda t: ["distill", *TINY, "distill.method=random", "--out", str(_file(t))],
     "--out='<tmp>/a-file': must be a folder, not a file"),
    ("distill output_dir under a file", lambda t: ["distill", *TINY, "distill.method=random", f"output_dir={_file(t)}/x"],
     "(<tmp>/a-file is a file)"),
    ("sweep --out naming a file", lambda t: ["sweep", "--out", str(_file(t))], "--out='<tmp>/a-file': must be a folder"),
]


@pytest.mark.parametrize("kind, argv, words", USAGE_ERRORS, ids=[c[0] for c in USAGE_ERRORS])
def test_a_bad_device_config_path_or_output_folder_is_one_line_naming_it(kind, argv, words, tmp_path, capsys, monkeypatch,
                                                                          reliability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(argv(tmp_path))
    lines = [line.replace(str(tmp_path), "<tmp>") for line in error_lines(capsys)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert not (tmp_path / "runs").exists()
    reliability("Bad command line (feddistill)", kind, f"exit 2: `{lines[0]}`")


@pytest.mark.slow
def test_a_federated_round_that_fails_is_one_line_naming_the_nodes(tmp_path, capsys, reliability):
    # Every honest update is far above a tiny multiple of the global model's norm: no round can aggregate.
    code = main(["simulate", *TINY, "split.num_clients=2", "federation.rounds=1", "distill.enabled=false",
                 "federation.max_update_global_ratio=1e-9", "--output-dir", str(tmp_path)])
    lines = [line for line in error_lines(capsys) if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, lines
    assert "round 1: 0 usable training replies of 2" in lines[0] and "x the global model's norm" in lines[0]
    assert lines[0].count("node ") == 2
    reliability("Bad command line (feddistill)", "a federated round without enough usable replies",
                f"exit 2: `{lines[0]}`")


def _tamper(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TAMPERED = [
    ("metrics.jsonl line without a round", lambda t: ["simulate", "--resume", str(
        _tamper(fake_run_folder(t) / "metrics.jsonl", '{"round": 0}\n{"elapsed": 1}\n').parent)],
     "metrics.jsonl: every line must be a JSON object with an integer 'round'"),
    ("metrics.jsonl line that is a list", lambda t: ["simulate", "--resume", str(
        _tamper(fake_run_folder(t) / "metrics.jsonl", "[0]\n").parent)], "metrics.jsonl: every line must be"),
    ("distill invocation.json without a config", lambda t: ["distill", "--resume", str(
        _tamper(t / "invocation.json", '{"model": null}').parent)], "invocation.json: must be a JSON object with 'config'"),
    ("distill invocation.json that is a list", lambda t: ["distill", "--resume", str(
        _tamper(t / "invocation.json", "[]").parent)], "invocation.json: must be a JSON object"),
]


@pytest.mark.parametrize("kind, argv, words", TAMPERED, ids=[c[0] for c in TAMPERED])
def test_a_tampered_resume_file_is_one_line_naming_it(kind, argv, words, tmp_path, capsys, reliability):
    code = main(argv(tmp_path))
    lines = [line.replace(str(tmp_path), "<tmp>") for line in error_lines(capsys)]
    assert code == 2 and len(lines) == 1 and words in lines[0], lines
    reliability("Crash and resume", f"--resume with a {kind}", f"exit 2: `{lines[0]}`")


DEEP = "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 600)) + "  " * 600 + "c: 1\n"
BAD_YAML = [
    ("YAML nested 600 levels", DEEP, "nested too deeply"),
    ("YAML flow lists nested 1000 levels", "[" * 1000 + "]" * 1000 + "\n", "nested too deeply"),
    ("an integer of 5000 digits", "federation:\n  rounds: " + "9" * 5000 + "\n", "line 2: 'rounds' is an integer of 5000 digits"),
    ("a float key given a 400-digit integer", "federation:\n  lr: " + "9" * 400 + "\n",
     "federation.lr=(an integer of 400 digits)"),
]


@pytest.mark.reliability
@pytest.mark.parametrize("kind, text, words", BAD_YAML, ids=[b[0] for b in BAD_YAML])
def test_a_pathological_yaml_is_one_line_naming_the_problem(kind, text, words, tmp_path, capsys, reliability):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["data", "--config", str(path)]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and words in lines[0] and len(lines[0]) < 300, lines
    reliability("Bad command line (feddistill)", f"config file: {kind}", f"exit 2: `{lines[0]}`")


def test_a_device_given_as_config_is_not_called_a_directory(capsys):
    assert main(["data", "--config", "/dev/null"]) == 2
    lines = error_lines(capsys)
    assert len(lines) == 1 and "not a file (a device, pipe or socket)" in lines[0] and "directory" not in lines[0], lines


def test_a_full_disk_while_saving_names_the_file(tmp_path, monkeypatch, capsys, reliability):
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, "/dev/full"))  # the real ENOSPC failure
    out = tmp_path / "out"
    assert main(["distill", "--config", "quickstart", *TINY, "distill.method=random", "evaluation.epochs=1",
                 "evaluation.num_nets=1", "--out", str(out)]) == 2
    lines = [line for line in error_lines(capsys) if not line[:4].isdigit()]  # progress lines start with the date
    assert len(lines) == 1 and str(out / "seed_0" / "synthetic.pt") in lines[0] and "a full disk?" in lines[0], lines
    reliability("Bad command line (feddistill)", "the disk fills while torch.save writes a result (/dev/full)",
                f"exit 2: `{lines[0]}`")


def test_a_full_disk_during_simulate_names_the_file(tmp_path, monkeypatch, capsys, reliability):
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, "/dev/full"))  # the ServerApp's thread too
    code = main(["simulate", *TINY, "split.num_clients=2", "federation.rounds=1", "distill.enabled=false",
                 "--output-dir", str(tmp_path)])
    lines = [line for line in error_lines(capsys) if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "round_0000.pt: cannot be written" in lines[0], lines
    reliability("Bad command line (feddistill)", "the disk fills during `simulate` (torch.save to /dev/full)",
                f"exit 2: `{lines[0]}`")
