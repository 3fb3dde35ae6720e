"""The CLI's user errors: exit code 2, one line naming the problem, no traceback."""

import subprocess
import sys

import pytest

from celora import cli


def _run_inprocess(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["celora", *args])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    out = capsys.readouterr()
    return ex.value.code, out.err.strip()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["run", "configs/quickstart.toml", "--set", "data.alpah=0.1"], "data.alpah: unknown key"),
        (["run", "configs/quickstart.toml", "--set", "data.alpha=-3"], "data.alpha"),
        (["run", "configs/quickstart.toml", "--set", "rounds=many"], "rounds"),
        (["run", "configs/quickstart.toml", "--set", "broken"], "key=value"),
        (["run", "does/not/exist.toml"], "config file not found"),
        (["run", "configs/quickstart.toml", "--set", "method=fedzzz"], "unknown method 'fedzzz'"),
        (["run", "configs/quickstart.toml", "--set", "model.name=gpt9"], "unknown model.name 'gpt9'"),
        (["run", "configs/quickstart.toml", "--set", "data.name=imagenet"], "unknown data.name 'imagenet'"),
        (["run", "configs/quickstart.toml", "--set", "data.path=/no/such.csv"], "data.path"),
    ],
)
def test_user_errors_are_one_line(monkeypatch, capsys, args, needle):
    code, err = _run_inprocess(monkeypatch, capsys, *args)
    assert code == 2
    assert needle in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_error_in_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "celora.cli", "run", "configs/quickstart.toml", "--set", "model.rank=0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: invalid config: model.rank")


def test_models_and_datasets_listing(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["celora", "models"])
    cli.main()
    assert "minilm" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", ["celora", "datasets"])
    cli.main()
    assert "bbcnews" in capsys.readouterr().out
