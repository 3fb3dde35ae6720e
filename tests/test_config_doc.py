"""The configuration reference is generated from the pydantic models and the shipped page equals it."""

import json
import sys
from pathlib import Path

import pytest

from celora import cli
from celora.config import config_reference, load_config
from celora.fl.strategies import STRATEGIES, key_users, unused_keys
from celora.report import REGENERATE_CONFIG_DOC, config_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_every_key_has_a_description():
    missing = [r["key"] for r in config_reference() if not r["description"].strip()]
    assert not missing, f"add Field(description=...) in celora/config.py for: {', '.join(missing)}"


def test_docs_page_equals_the_schema():
    shipped = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    assert shipped == config_markdown(), f"docs/configuration.md is stale: run `{REGENERATE_CONFIG_DOC}`"


def test_cli_prints_every_key_default_and_description(monkeypatch, capsys):
    monkeypatch.setattr(cli.console, "width", 400)
    monkeypatch.setattr(sys, "argv", ["celora", "config"])
    cli.main()
    out = capsys.readouterr().out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    for r in config_reference():
        assert r["key"] in lines, r["key"]
        assert r["default"] in lines[r["key"]] and r["description"] in lines[r["key"]]
    monkeypatch.setattr(sys, "argv", ["celora", "config", "--json"])
    cli.main()
    schema = json.loads(capsys.readouterr().out)
    assert schema["$defs"]["AggregationConfig"]["properties"]["lam"]["description"]


def test_method_keys_are_real_keys():
    keys = {r["key"] for r in config_reference()}
    for key, methods in key_users().items():
        assert key in keys, f"{methods} declare unknown config key {key}"
    assert key_users()["aggregation.lam"] == ["celora"]
    assert set(STRATEGIES["local"].hyperparameters) == set()


@pytest.mark.parametrize(
    "overrides,warned",
    [
        (["method=fedit", "aggregation.lam=2"], ["aggregation.lam"]),
        (["method=fedit", "privacy.summary_epsilon=1"], ["privacy.summary_epsilon"]),
        (["method=local", "aggregation.head=shared"], ["aggregation.head"]),
        (["method=celora", "aggregation.lam=2", "aggregation.head=local"], []),
        (["method=fedit"], []),  # defaults are never warned about
        (["method=fedit", "aggregation.lam=2", "aggregation.warmup_rounds=1", "aggregation.warmup_method=celora"], []),
    ],
)
def test_unused_key_warning(overrides, warned):
    lines = unused_keys(load_config(None, overrides))
    assert [line.split()[0] for line in lines] == warned
    assert all("\n" not in line and "used by: " in line for line in lines)


def test_run_prints_the_warning_in_one_line(monkeypatch, capsys):
    # an unknown model stops the run right after the warning: nothing is trained
    args = ["run", "--set", "method=fedit", "--set", "aggregation.lam=3", "--set", "model.name=nosuch"]
    monkeypatch.setattr(sys, "argv", ["celora", *args])
    with pytest.raises(SystemExit):
        cli.main()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: aggregation.lam is set but method fedit does not use it")
    assert err[1].startswith("error: unknown model.name")


def test_compare_warns_only_about_keys_no_compared_method_reads():
    cfg = load_config(None, ["aggregation.lam=2", "privacy.summary_clip=5"])
    assert unused_keys(cfg, ["celora", "fedit"]) == []
    (line,) = [x for x in unused_keys(cfg, ["fedit", "local"]) if x.startswith("aggregation.lam")]
    assert "methods fedit, local do not use it (used by: celora)" in line
