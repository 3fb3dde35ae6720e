"""`celora compare`: identical partitions, one table, resumable."""

import csv
import json

import pytest

from celora.compare import aggregate_rows, markdown_table, parse_seeds, run_comparison
from celora.config import load_config
from celora.errors import CeloraError

SMALL = ("model.rank=2", "model.max_length=32", "rounds=1", "data.max_samples=120", "train.max_steps=2")


def test_compare_writes_table_and_resumes(tmp_path, tiny_config):
    base = tiny_config(*SMALL)
    out = tmp_path / "cmp"
    started = []
    rows = run_comparison(
        base, ["celora-global", "local"], [0, 1], out, observer_for=lambda m, s: started.append((m, s))
    )
    assert len(rows) == 4 and len(started) == 4
    for name in ("compare.csv", "compare.md", "compare.png"):
        assert (out / name).is_file()
    with (out / "compare.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 4
    md = (out / "compare.md").read_text()
    assert "| celora-global | 2 |" in md and "| local | 2 |" in md
    # identical partitions across methods for the same seed
    p1 = json.loads((out / "celora-global" / "seed_0" / "partition.json").read_text())
    p2 = json.loads((out / "local" / "seed_0" / "partition.json").read_text())
    assert p1 == p2
    # "interrupt": one cell lost its completion marker; a re-run completes only that cell
    (out / "local" / "seed_1" / "cell.json").unlink()
    started.clear()
    skipped = []
    rows2 = run_comparison(
        base,
        ["celora-global", "local"],
        [0, 1],
        out,
        observer_for=lambda m, s: started.append((m, s)),
        on_skip=lambda m, s: skipped.append((m, s)),
    )
    assert started == [("local", 1)] and len(skipped) == 3 and len(rows2) == 4


def test_aggregate_mean_std():
    rows = [
        {
            "method": "m",
            "seed": s,
            "acc_mean": a,
            "acc_weighted": a,
            "acc_worst10": a,
            "acc_mean_agg": a,
            "acc_global": a,
            "bytes_up_per_client_round": 10,
            "bytes_down_per_client_round": 10,
            "bytes_total": 100,
            "wall_s": 1,
        }
        for s, a in enumerate([0.5, 0.7])
    ]
    agg = aggregate_rows(rows, ["m"])
    assert agg[0]["acc_mean"] == pytest.approx(0.6) and agg[0]["acc_mean_std"] == pytest.approx(0.1414, abs=1e-3)
    assert "0.600 ± 0.141" in markdown_table(agg)


def _row(method, seed, acc, agg=None):
    return {
        "method": method,
        "seed": seed,
        "acc_mean": acc,
        "acc_weighted": acc,
        "acc_worst10": acc,
        "acc_mean_agg": acc if agg is None else agg,
        "acc_global": acc,
        "bytes_up_per_client_round": 10,
        "bytes_down_per_client_round": 10,
        "bytes_total": 100,
        "wall_s": 1,
    }


def test_paired_difference_to_local_is_per_seed():
    rows = [_row("local", 0, 0.5), _row("local", 1, 0.9), _row("m", 0, 0.6, 0.7), _row("m", 1, 1.0, 0.9)]
    rows.append(_row("m", 2, 0.1))  # a seed local has not run: not paired
    local, m = aggregate_rows(rows, ["local", "m"])
    assert m["delta_local"] == pytest.approx(0.1) and m["delta_local_std"] == pytest.approx(0.0, abs=1e-12)
    assert m["delta_local_agg"] == pytest.approx(0.1) and m["delta_local_agg_std"] == pytest.approx(0.1414, abs=1e-3)
    assert m["acc_mean_std"] > 0.4  # the seeds differ a lot, the paired difference does not
    md = markdown_table([local, m])
    assert "+0.100 ± 0.000 / +0.100 ± 0.141" in md and "| local | 2 |" in md
    assert "Δ vs local" in md.splitlines()[0]
    (alone,) = aggregate_rows([_row("m", 0, 0.5)], ["m"])
    assert "| – |" in markdown_table([alone])


def test_bad_inputs(tiny_config):
    with pytest.raises(CeloraError, match="--seeds"):
        parse_seeds("0,x")
    with pytest.raises(CeloraError, match="unknown method 'nope'"):
        run_comparison(tiny_config(*SMALL), ["local", "nope"], [0], "/tmp/never-created-celora")


def test_variants_are_columns_with_their_own_overrides(tmp_path, tiny_config):
    from celora.compare import parse_variants

    variants = parse_variants(["frozenC=celora-global;model.train_c=false", "r4=celora-global;model.rank=4"])
    out = tmp_path / "cmp"
    rows = run_comparison(tiny_config(*SMALL), ["local", "frozenC", "r4"], [0], out, variants=variants)
    assert [r["method"] for r in rows] == ["local", "frozenC", "r4"]
    assert (out / "frozenC" / "seed_0" / "cell.json").is_file()
    assert "train_c = false" in (out / "frozenC" / "seed_0" / "config.toml").read_text()
    assert "train_c = false" not in (out / "r4" / "seed_0" / "config.toml").read_text()
    # rank 4 sends 4× the C bytes of rank 2 (tensor bytes; framing is the same)
    by = {r["method"]: r["bytes_up_per_client_round"] for r in rows}
    assert by["r4"] > by["frozenC"] > 0 and by["local"] == 0
    assert "| r4 | 1 |" in (out / "compare.md").read_text()


@pytest.mark.parametrize("text", ["celora", "=celora", "x=", "bad label=celora", "a/b=celora"])
def test_bad_variants(text):
    from celora.compare import parse_variant

    with pytest.raises(CeloraError, match="--variant"):
        parse_variant(text)


def test_repeated_variant_label():
    from celora.compare import parse_variants

    with pytest.raises(CeloraError, match="given twice"):
        parse_variants(["a=local", "a=fedit"])


@pytest.mark.parametrize(
    ("model", "methods", "extra"),
    [
        ("tiny-dinov2", ["celora", "local"], ["data.max_samples=60", "data.image_size=28"]),
        ("tiny-vlm", ["celora", "fedit"], ["data.max_samples=30", "data.image_size=28", "model.max_length=160"]),
    ],
)
def test_compare_runs_the_image_tasks(tmp_path, model, methods, extra):
    base = load_config(
        None,
        [
            f"model.name={model}",
            "model.rank=2",
            "num_clients=2",
            "rounds=1",
            "data.name=digits",
            "train.max_steps=1",
            "train.batch_size=8",
            "train.threads=1",
            *extra,
        ],
    )
    rows = run_comparison(base, methods, [0], tmp_path / "cmp")
    assert [r["method"] for r in rows] == methods
    for r in rows:  # each cell reports its own run: the run folder's summary, not a copy of another cell
        summary = json.loads((tmp_path / "cmp" / r["method"] / "seed_0" / "summary.json").read_text())
        assert (r["acc_mean"], r["acc_global"]) == (summary["acc_mean"], summary["acc_global"])
        if model == "tiny-vlm":  # the image-prompt task reports greedy exact match too
            assert r["exact_match_mean"] == summary["exact_match_mean"]
    shared = next(r for r in rows if r["method"] != "local")
    assert shared["bytes_up_per_client_round"] > 0
    if model == "tiny-vlm":
        assert "exact_match_mean" in (tmp_path / "cmp" / "compare.csv").read_text()
