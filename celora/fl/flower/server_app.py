"""The celora ServerApp: reads the run config, builds the experiment and drives ``CeloraFlowerStrategy``.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, override with ``flwr run --run-config``):
``config`` (experiment TOML; relative paths resolve against the app folder), ``set`` (space-separated
``key=value`` overrides as for ``celora run --set``), ``out`` (run folder; relative to the ServerApp's
working directory), ``round-timeout`` and ``node-wait`` (seconds), ``export`` (adapters, bool), ``resume``
(bool: continue ``out`` from its newest checkpoint; the nodes restore their state from their ``state-dir``).
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from flwr.app import Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, ValidationError  # noqa: E402

from celora.config import ExperimentConfig, load_config  # noqa: E402
from celora.errors import CeloraError  # noqa: E402
from celora.eval import MetricSpec  # noqa: E402

app = ServerApp()
ERROR_FILE = "error.txt"  # the run's one-line error, when the ServerApp stops on a CeloraError


class FlowerOptions(BaseModel):
    """The celora keys of a Flower run config (``[tool.flwr.app.config]``)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    config: str = ""
    set: str = ""
    out: str = ""
    round_timeout: float = Field(600.0, gt=0, alias="round-timeout")
    node_wait: float = Field(120.0, gt=0, alias="node-wait")
    export: bool = True
    resume: bool = False

    @classmethod
    def from_run_config(cls, run_config: dict[str, object]) -> FlowerOptions:
        try:
            return cls.model_validate(run_config)
        except ValidationError as err:
            e = err.errors()[0]
            raise CeloraError(f"flower run config: {'.'.join(map(str, e['loc']))}: {e['msg']}") from None


def _app_dir(grid: Grid) -> Path | None:
    """The installed FAB folder of this run (where a relative ``config`` path points)."""
    try:
        from flwr.common.config import get_project_dir

        run = grid.run
        return get_project_dir(run.fab_id, run.fab_version, run.fab_hash)
    except Exception:  # noqa: BLE001  (no FAB: e.g. a Grid in tests)
        return None


def resolve(opts: FlowerOptions, app_dir: Path | None) -> tuple[ExperimentConfig, Path]:
    """(ExperimentConfig, run folder) from the run-config options."""
    path: Path | None = None
    if opts.config:
        path = Path(opts.config).expanduser()
        if not path.is_absolute() and app_dir is not None and (app_dir / path).is_file():
            path = app_dir / path
    cfg = load_config(path, shlex.split(opts.set))
    stem = path.stem if path else "default"
    default = Path("runs") / f"{stem}-{cfg.method}-flower-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(opts.out).expanduser() if opts.out else default
    return cfg, out.resolve()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one celora experiment over the connected SuperNodes and write its run folder."""
    from celora.fl.flower.server import CeloraFlowerStrategy

    opts = FlowerOptions.from_run_config(dict(context.run_config))
    cfg, out = resolve(opts, _app_dir(grid))
    strategy = CeloraFlowerStrategy(
        cfg,
        out,
        round_timeout=opts.round_timeout,
        node_wait=opts.node_wait,
        export=opts.export,
        resume=opts.resume,
    )
    try:
        summary = strategy.run(grid)
    except CeloraError as err:  # one line for `celora run --runtime flower` (e.g. a site's bad file)
        out.mkdir(parents=True, exist_ok=True)
        (out / ERROR_FILE).write_text(str(err), encoding="utf-8")
        raise
    p = MetricSpec.of(summary).primary
    print(f"celora: run folder {out}; {p} mean {summary[f'{p}_mean']:.4f}", flush=True)
