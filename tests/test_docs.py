"""The README and docs/ as a new user reads them: short README, links that resolve, headline numbers equal to the
committed results, and every shell command valid (its celora flags parse, its scripts and configs exist).
Blocks fenced as ```bash run are cheap and actually run."""

import re
import runpy
import shlex
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from celora import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", re.S | re.M)
CELORA = {"celora", ".venv/bin/celora"}
PYTHON = {"python", "python3", ".venv/bin/python"}


def shell_blocks(path: Path) -> list[tuple[str, str]]:
    """(info after the language, body) of every ```bash block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(m[2].strip(), m[3]) for m in FENCE.finditer(text) if m[1] in ("bash", "sh", "shell")]


def commands(body: str) -> list[list[str]]:
    """Simple commands of a shell block: continuations joined, comments dropped, split at ; && || |,
    loop keywords and leading VAR=value assignments removed."""
    out: list[list[str]] = []
    for line in body.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        seg: list[str] = []
        for tok in [*lex, ";"]:
            if tok in (";", "&&", "||", "|", "&"):
                while seg and (seg[0] in ("do", "then", "done") or re.match(r"^\w+=", seg[0])):
                    seg.pop(0)
                if seg and seg[0] not in ("for", "if", "fi"):
                    out.append(seg)
                seg = []
            else:
                seg.append(tok)
    return out


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))


def check_command(cmd: list[str]) -> str | None:
    """Why ``cmd`` would not work as written on a fresh clone (None if it would, or is not ours to check)."""
    prog, args = cmd[0], cmd[1:]
    if prog in CELORA:
        group = typer.main.get_command(cli.app)
        assert isinstance(group, click.Group)
        if not args or args[0] not in group.commands:
            return f"unknown celora command {args[:1]}"
        sub = group.commands[args[0]]
        try:
            ctx = sub.make_context(args[0], list(args[1:]))
        except click.UsageError as err:
            return f"celora {args[0]}: {err.format_message()}"
        config = ctx.params.get("config")
        if config is not None and str(config).startswith("configs/") and not (ROOT / str(config)).is_file():
            return f"{config} does not exist"
        return None
    if prog == "bash" or (prog in PYTHON and args and args[0].endswith(".py")):
        script = args[0]
        return None if (ROOT / script).is_file() else f"{script} does not exist"
    if prog == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t and t not in make_targets()]
        return f"make targets {missing} do not exist" if missing else None
    return None


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= 220, f"README.md has {n} lines (at most 220: move detail into docs/)"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: link to missing {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_shell_commands_are_valid(doc):
    problems = []
    for _, body in shell_blocks(doc):
        for cmd in commands(body):
            why = check_command(cmd)
            if why:
                problems.append(f"{' '.join(cmd)}: {why}")
    assert not problems, f"{doc.name}:\n" + "\n".join(problems)


def test_commands_parser_and_checker():
    body = "for a in 0.1 1.0; do bash benchmarks/nope.sh $a; done  # comment\nX=1 .venv/bin/celora run \\\n  --bogus\n"
    cmds = commands(body)
    assert cmds == [["bash", "benchmarks/nope.sh", "$a"], [".venv/bin/celora", "run", "--bogus"]]
    assert "does not exist" in (check_command(cmds[0]) or "")
    assert "No such option" in (check_command(cmds[1]) or "")
    assert check_command(["celora", "run", "configs/nope.toml"]) == "configs/nope.toml does not exist"
    assert check_command(["celora", "run", "configs/quickstart.toml", "--set", "rounds=1"]) is None
    assert check_command(["make", "nosuch"]) is not None and check_command(["make", "run"]) is None


def test_runnable_blocks_run():
    runner = CliRunner()
    ran = 0
    for doc in DOCS:
        for info, body in shell_blocks(doc):
            if info.split()[:1] != ["run"]:
                continue
            for cmd in commands(body):
                assert cmd[0] in CELORA, f"{doc.name}: only celora commands are run, got {cmd}"
                res = runner.invoke(cli.app, cmd[1:])
                assert res.exit_code == 0, f"{doc.name}: {' '.join(cmd)} failed:\n{res.output}"
                ran += 1
    assert ran >= 4


def test_headline_numbers_equal_the_committed_results():
    headline = runpy.run_path(str(ROOT / "benchmarks" / "headline.py"))
    stale = headline["stale_blocks"]()
    assert not stale, f"stale headline blocks {stale}: run `{headline['COMMAND']}`"
