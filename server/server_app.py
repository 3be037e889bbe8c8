"""The ServerApp: resolves the experiment config from the run config and runs server.federation.

Run config keys ([tool.flwr.app.config] in pyproject.toml; override with `flwr run . -c 'key=value'`):
  config      a YAML under configs/ by name, or an absolute path (default "quickstart")
  overrides   dotted overrides as on the feddistill command line: "federation.rounds=5 model.width=64"
  data.path, federation.rounds, split.num_clients   shortcuts for the commonest overrides ("" / 0: keep the YAML's)
  output-dir  absolute folder for run folders (else $FEDDISTILL_OUTPUT, else output_dir resolved against the cwd)
  run-dir     an exact absolute run folder (used by `feddistill simulate`)
  node-data   absolute folder of `feddistill partition`: the server opens only its manifest.json, public.tar.gz
              and test.tar.gz there (a deployment where each node holds only its own data); "" cuts the full dataset
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import ConfigError, ExperimentConfig, load_config, parse_overrides
from server.federation import RoundCallback, resolve_run_dir, run_federation
from server.resume import ResumePoint
from server.server_data import from_node_data
from server.stoppable_grid import ServerAppControl, StoppableGrid
from server.strategy import ReplyObserver

RUN_CONFIG_DEFAULTS: dict[str, Any] = {"config": "quickstart", "overrides": "", "output-dir": "", "run-dir": "", "node-data": ""}


def config_from_run_config(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """The ExperimentConfig named by a run config; ConfigError naming the key.

    `config` names the YAML; `overrides` holds dotted key=value pairs; dotted run-config keys declared in
    pyproject.toml (e.g. "federation.rounds") override too, unless they hold their "keep" value ("" or 0).
    """
    merged = {**RUN_CONFIG_DEFAULTS, **run_config}
    try:
        words = shlex.split(str(merged["overrides"]))
    except ValueError as err:  # e.g. an unclosed quote
        raise ConfigError(f"run config overrides={str(merged['overrides'])[:80]!r}: {err}") from None
    overrides = parse_overrides(words)
    overrides.update({k: v for k, v in merged.items() if "." in k and v not in ("", 0)})
    return load_config(str(merged["config"]) or "quickstart", overrides)


def make_server_app(
    cfg: ExperimentConfig | None = None,
    run_dir: Path | None = None,
    on_round: RoundCallback | None = None,
    observer: ReplyObserver | None = None,
    resume: ResumePoint | None = None,
    control: ServerAppControl | None = None,
) -> ServerApp:
    """A ServerApp; with `cfg` (and `run_dir`) it ignores the run config (run_simulation passes an empty one).
    `resume` continues `run_dir` after its last complete round. `control`: the ServerApp records there when it starts
    and ends, and once `control.stop` is set its next grid call raises (server/stoppable_grid.py), so a driver whose
    simulation engine failed can end it."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if control is not None:
            control.started.set()
            grid = StoppableGrid(grid, control.stop)
        try:
            run_config = {**RUN_CONFIG_DEFAULTS, **context.run_config}
            experiment = cfg if cfg is not None else config_from_run_config(run_config)
            folder = run_dir or resolve_run_dir(experiment, run_config["output-dir"] or None, run_config["run-dir"] or None)
            data = from_node_data(experiment, Path(run_config["node-data"])) if run_config["node-data"] else None
            run_federation(grid, experiment, folder, on_round=on_round, observer=observer, resume=resume, data=data)
        finally:
            if control is not None:
                control.finished.set()

    return server_app


app = make_server_app()
