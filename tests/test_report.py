"""Run-folder reports: tables, plots and the self-contained HTML page (on committed run and comparison folders)."""

import html
import re
import shutil
import sys
from pathlib import Path

import pytest

from celora import cli
from celora.errors import CeloraError
from celora.fl.simulation import run_experiment
from celora.report import plot_weights, top_collaborators, write_html_report

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
RAW_FLOAT = re.compile(r"\d\.\d{7,}")  # e.g. 0.9261710606129242: no number on the page is printed raw


def visible_text(page: str) -> str:
    """The page without embedded images and markup (what a reader sees)."""
    return re.sub(r"<[^>]+>", " ", re.sub(r'src="data:image/png;base64,[^"]*"', "", page))


def test_html_report_for_a_run(tmp_path, tiny_config):
    out = tmp_path / "run"
    cfg = tiny_config("model.rank=2", "model.max_length=32", "rounds=1", "data.max_samples=90", "train.max_steps=1")
    res = run_experiment(cfg, out, export_adapters=False)
    plot_weights(res.diagnostics["weights"], out / "weights.png")
    page = write_html_report(out).read_text()
    assert "<table>" in page and "data:image/png;base64," in page and "celora run: celora" in page
    assert not RAW_FLOAT.search(visible_text(page))
    with pytest.raises(CeloraError, match="not a run folder"):
        write_html_report(tmp_path)


def test_run_page_of_the_committed_vit_run(tmp_path):
    run = shutil.copytree(RESULTS / "vit-digits", tmp_path / "vit-digits")
    page = write_html_report(run).read_text(encoding="utf-8")
    text = visible_text(page)
    assert not RAW_FLOAT.search(text), RAW_FLOAT.search(text)
    assert "celora run: celora" in text and "model dinov2s (rank 8)" in text and "travels: C, head" in text
    assert "0.800" in text and "21.8 KB / 21.8 KB" in text  # summary.json: 0.8002268490820384, 21800.0 B
    assert 'name = "dinov2s"' in html.unescape(page)  # the resolved config
    # accuracy.png + bytes per round + label distribution + per-client accuracy + weights.png
    assert page.count("data:image/png;base64,") == 5


def test_compare_page_renders_the_cells_not_markdown(tmp_path):
    cmp = tmp_path / "cmp"
    for method in ("local", "celora", "fedit"):
        shutil.copytree(RESULTS / "small-alpha1.0" / method, cmp / method)
    shutil.copy(RESULTS / "small-alpha1.0" / "compare.csv", cmp)  # the run order of the methods
    page = write_html_report(cmp).read_text(encoding="utf-8")  # no compare.md, no compare.png: from the cells
    text = visible_text(page)
    assert not RAW_FLOAT.search(text)
    assert "3 methods × 3 seeds" in text and "0.897 ± 0.005" in text and "+0.016 ± 0.016 / +0.033 ± 0.017" in text
    assert "302.9 KB" in text and page.count("data:image/png;base64,") == 1  # the accuracy-vs-bytes plot
    assert re.findall(r"<tr><td class=l>([^<]+)</td><td>3</td>", page) == ["local", "fedit", "celora"]


def test_top_collaborators_excludes_self_and_zero():
    w = [[0.5, 0.3, 0.2, 0.0], [0.1, 0.6, 0.0, 0.3], [0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25]]
    tops = top_collaborators(w, k=2)
    assert tops[0] == [(1, 0.3), (2, 0.2)] and tops[1] == [(3, 0.3), (0, 0.1)] and 2 not in tops


def test_cli_report_bad_folder(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["celora", "report", str(tmp_path)])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    assert ex.value.code == 2 and "not a run folder" in capsys.readouterr().err
