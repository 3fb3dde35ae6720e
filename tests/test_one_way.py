"""One way to do each thing: one registry type (duplicates are errors), no import cycles, no private names
across modules, one asset lookup, one default-targets rule, the pinned POT entry point, process trees via psutil."""

import ast
import re
import time
from pathlib import Path

import numpy as np
import pytest

from celora.errors import CeloraError
from celora.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "celora"


def registries() -> dict[str, Registry]:
    from celora.adapters.bases import BASES
    from celora.data.partition import PARTITIONERS
    from celora.data.sources import DATASETS
    from celora.data.tasks import TASKS
    from celora.fl.strategies import STRATEGIES
    from celora.models.zoo import ZOO
    from celora.privacy.attacks import ATTACKS

    return {
        "method": STRATEGIES,
        "data.name": DATASETS,
        "data.partition": PARTITIONERS,
        "data.task": TASKS,
        "model.name": ZOO,
        "model.basis": BASES,
        "attack": ATTACKS,
    }


@pytest.mark.parametrize(
    "key", ["method", "data.name", "data.partition", "data.task", "model.name", "model.basis", "attack"]
)
def test_every_registry_refuses_duplicates_and_names_the_key(key):
    reg = registries()[key]
    assert isinstance(reg, Registry) and reg.key == key and len(reg) >= 2
    name = sorted(reg)[0]
    before = reg[name]
    with pytest.raises(ValueError, match="registered twice"):
        reg[name] = before
    with pytest.raises(ValueError, match="registered twice"):
        reg.add(name, before)
    with pytest.raises(TypeError):
        reg.update({name: before})
    assert reg[name] is before
    with pytest.raises(CeloraError, match=rf"unknown {re.escape(key)} 'nosuch' \(known: {re.escape(name)}"):
        reg.lookup("nosuch")


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every ``from celora… import …`` / ``import celora…`` in a file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("celora"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("celora")]
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_private_names_imported_across_modules():
    bad = [
        f"{module_name(p)} imports {n} from {mod}"
        for p in PACKAGE.rglob("*.py")
        for mod, names in imports(p)
        for n in names
        if n.startswith("_") and mod != module_name(p)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_modules():
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for mod, names in imports(p):
            targets = {f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules} or {mod}
            graph[m] |= {t for t in targets if t in modules and t != m and not m.startswith(t + ".")}
    # a package's __init__ importing its submodules for registration is not a cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_one_asset_lookup_names_the_requirement(monkeypatch):
    import importlib.util

    from celora.assets import package_dir

    assert package_dir("sklearn", "scikit-learn==1.9.1", "x").is_dir()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CeloraError, match=r"^dataset 'y' needs the package abc: pip install --no-deps abc==1\.0$"):
        package_dir("abc", "abc==1.0", "dataset 'y'")
    for p in PACKAGE.rglob("*.py"):
        if p.name != "assets.py":
            assert "submodule_search_locations" not in p.read_text(encoding="utf-8"), f"{p}: use celora.assets"


def test_default_targets_one_rule(tiny_bert):
    from celora.models.zoo import default_targets, load_model

    assert default_targets(tiny_bert.model) == ("query", "value") == tiny_bert.default_targets
    llama = load_model("tiny-llama", num_labels=2, seed=0)
    assert default_targets(llama.model) == ("q_proj", "v_proj") == llama.default_targets


def test_pot_private_network_simplex_is_pinned_and_equals_the_public_api():
    """celora.fl.similarity calls POT's network simplex without ot.emd2's checks (ot.lp.emd_wrap.emd_c, a
    private entry point): this test fails on a POT upgrade, so whoever upgrades re-checks the call."""
    import ot

    from celora.fl.similarity import exact_ot_cost

    pin = re.search(r"^pot==(\S+)$", (ROOT / "requirements.txt").read_text(encoding="utf-8"), re.M)
    assert pin and ot.__version__ == pin.group(1), f"POT {ot.__version__} != pinned {pin and pin.group(1)}"
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(5))
    cost = np.ascontiguousarray(rng.random((4, 5)))
    assert exact_ot_cost(a, b, cost) == pytest.approx(float(ot.emd2(a, b, cost)), abs=1e-12)


def test_process_tree_stopped_with_psutil(tmp_path):
    import psutil

    from celora.fl.flower.deploy import Proc, descendants

    proc = Proc.start(
        "tree", ["bash", "-c", "sleep 60 & sleep 60 & wait"], tmp_path / "log", env={"PATH": "/usr/bin:/bin"}
    )
    deadline = time.monotonic() + 10
    while len(descendants(proc.popen.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    below = descendants(proc.popen.pid)
    assert len(below) == 2
    proc.stop(grace=5)
    assert not proc.alive()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in below)


def test_model_loading_leaves_transformers_logging_as_it_was():
    from transformers.utils import logging as hf_logging

    from celora.models.zoo import load_model

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        load_model("tiny-bert", num_labels=2, seed=0)
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.set_verbosity(before)
