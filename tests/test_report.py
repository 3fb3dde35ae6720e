"""Run-folder reports: tables, plots and the self-contained HTML page."""

import sys

import pytest

from celora import cli
from celora.config import load_config
from celora.errors import CeloraError
from celora.fl.simulation import run_experiment
from celora.report import plot_weights, top_collaborators, write_html_report


def test_html_report_for_a_run(tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            "model.name=tiny-bert",
            "model.rank=2",
            "model.max_length=32",
            "num_clients=3",
            "rounds=1",
            "data.max_samples=90",
            "train.max_steps=1",
            "method=celora",
        ],
    )
    res = run_experiment(cfg, out, export_adapters=False)
    plot_weights(res.diagnostics["weights"], out / "weights.png")
    page = write_html_report(out).read_text()
    assert "<table>" in page and "data:image/png;base64," in page and "celora run: celora" in page
    with pytest.raises(CeloraError, match="not a run folder"):
        write_html_report(tmp_path)


def test_top_collaborators_excludes_self_and_zero():
    w = [[0.5, 0.3, 0.2, 0.0], [0.1, 0.6, 0.0, 0.3], [0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]]
    tops = top_collaborators(w, k=2)
    assert tops[0] == [(1, 0.3), (2, 0.2)] and tops[1] == [(3, 0.3), (0, 0.1)] and 2 not in tops


def test_cli_report_bad_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["celora", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    assert ex.value.code == 2 and "not a run folder" in capsys.readouterr().err
