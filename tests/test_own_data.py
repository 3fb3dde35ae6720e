"""Bring your own data: a CSV with text/label columns runs end to end through the CLI."""

import json
import subprocess
import sys

import numpy as np


def test_own_csv_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    words = {"sport": ["goal", "match", "team", "coach"], "money": ["bank", "stock", "price", "market"]}
    rows = ["body,topic"]
    for k in range(80):
        topic = "sport" if k % 2 else "money"
        rows.append(" ".join(rng.choice(words[topic], size=6)) + f",{topic}")
    rows.append(",money")  # an unreadable row: skipped and counted
    csv = tmp_path / "mine.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "celora.cli",
            "run",
            "--out",
            str(out),
            "--no-export",
            "--set",
            f"data.path={csv}",
            "--set",
            "data.text_column=body",
            "--set",
            "data.label_column=topic",
            "--set",
            "model.name=tiny-bert",
            "--set",
            "num_clients=2",
            "--set",
            "rounds=1",
            "--set",
            "model.max_length=40",
            "--set",
            "train.max_steps=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    part = json.loads((out / "partition.json").read_text())
    assert part["skipped_rows"] == 1 and set(part["clients"][0]["label_hist"]) == {"money", "sport"}
    assert (out / "summary.json").is_file() and (out / "accuracy.png").is_file()


def test_own_csv_missing_column_is_one_line(tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text("text,label\nhello,a\nworld,b\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "celora.cli",
            "run",
            "--set",
            f"data.path={csv}",
            "--set",
            "data.label_column=nope",
            "--set",
            "model.name=tiny-bert",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
