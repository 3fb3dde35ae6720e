"""`celora comm`: bytes per client-round from shapes, checked against the closed forms."""

import json
import sys

import pytest

from celora import cli
from celora.errors import CeloraError
from celora.fl.comm import comm_table


@pytest.mark.parametrize("name,d,layers", [("tiny-llama", 32, 2), ("smollm2-135m", 576, 30), ("llama-7b", 4096, 32)])
@pytest.mark.parametrize("r", [4, 8])
def test_closed_forms(name, d, layers, r):
    rows = {x["method"]: x for x in comm_table(name, r, ["q_proj", "v_proj"] if name != "tiny-llama" else None)}
    assert rows["celora"]["params"] == 2 * layers * r * r
    assert rows["celora"]["tensor_bytes"] == 4 * 2 * layers * r * r
    assert rows["celora"]["framing_bytes"] == rows["celora"]["bytes_up"] - rows["celora"]["tensor_bytes"] > 0
    kv = {"tiny-llama": d // 2, "smollm2-135m": d // 3, "llama-7b": d}[name]  # GQA shrinks v_proj's output
    assert rows["fedit"]["params"] == layers * r * (2 * d) + layers * r * (d + kv)
    assert rows["local"]["bytes_up"] == 0


def test_hf_folder_and_errors(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "hidden_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "intermediate_size": 128,
                "vocab_size": 100,
            }
        )
    )
    rows = {x["method"]: x for x in comm_table(str(tmp_path), 4)}
    assert rows["celora"]["params"] == 2 * 3 * 16 and rows["fedit"]["params"] == 2 * 3 * 4 * 128
    with pytest.raises(CeloraError, match="--model"):
        comm_table("no-such-model", 8)
    with pytest.raises(CeloraError, match="--rank"):
        comm_table("tiny-llama", 0)


def test_cli_json(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["celora", "comm", "--model", "llama-7b", "--rank", "8", "--json"])
    cli.main()
    data = json.loads(capsys.readouterr().out)
    rows = {x["method"]: x for x in data["methods"]}
    assert rows["fedit"]["bytes_up"] / rows["celora"]["bytes_up"] > 1000


def test_num_labels_adds_the_head_where_it_is_shared():
    rows = {x["method"]: x for x in comm_table("llama-7b", 8, ["q_proj", "v_proj"], num_labels=5)}
    head = 4 * (4096 * 5 + 5)
    for m in ("celora", "celora-global", "fedit", "ffa"):  # these share the head by default
        extra = rows[m]["bytes_with_head"] - rows[m]["bytes_up"]
        assert rows[m]["head_shared"] and head <= extra < head + 200, m
    assert rows["celora"]["tensor_bytes"] == 4 * 2 * 32 * 64  # the adapter column is still 2·L·r²
    for m in ("fedsa", "fedsb"):
        assert not rows[m]["head_shared"] and rows[m]["bytes_with_head"] == rows[m]["bytes_up"]
    assert rows["local"]["bytes_with_head"] == 0 and not rows["local"]["head_shared"]
    with pytest.raises(CeloraError, match="--num-labels"):
        comm_table("llama-7b", 8, num_labels=1)


def test_cli_with_head(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["celora", "comm", "--model", "llama-7b", "--num-labels", "5", "--json"])
    cli.main()
    rows = {x["method"]: x for x in json.loads(capsys.readouterr().out)["methods"]}
    assert rows["celora"]["bytes_with_head"] > rows["celora"]["bytes_up"] and rows["celora"]["head_shared"]
