import pytest

from celora.config import apply_overrides, dump_config, load_config, parse_value
from celora.errors import CeloraError


def test_defaults_and_quickstart_load():
    cfg = load_config("configs/quickstart.toml")
    assert cfg.model.name == "minilm" and cfg.model.rank == 8 and cfg.num_clients == 10
    assert cfg.data.partition == "dirichlet" and cfg.data.alpha == 0.5


def test_overrides_typed_and_nested():
    cfg = load_config(
        "configs/quickstart.toml",
        ["data.alpha=0.1", "model.targets=['query']", "method=fedit", "train.lr=2e-4", "clients_per_round=5"],
    )
    assert cfg.data.alpha == 0.1 and cfg.model.targets == ["query"] and cfg.method == "fedit"
    assert cfg.train.lr == 2e-4 and cfg.sampled_per_round == 5


def test_parse_value():
    assert parse_value("3") == 3 and parse_value("true") is True and parse_value("dirichlet") == "dirichlet"
    assert parse_value('"x y"') == "x y" and parse_value("[1, 2]") == [1, 2]


@pytest.mark.parametrize(
    "override,field",
    [
        ("data.alpah=0.1", "data.alpah: unknown key"),
        ("data.alpha=-1", "data.alpha"),
        ("data.alpha=abc", "data.alpha"),
        ("rounds=0", "rounds"),
        ("data.partition=weird", "data.partition"),
        ("nosuch=1", "nosuch: unknown key"),
        ("clients_per_round=99", "clients_per_round"),
    ],
)
def test_bad_overrides_name_the_field(override, field):
    with pytest.raises(CeloraError, match=field.replace(".", r"\.")) as info:
        load_config("configs/quickstart.toml", [override])
    assert "\n" not in str(info.value)


def test_bad_override_syntax_and_section():
    with pytest.raises(CeloraError, match="key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(CeloraError, match="not a section"):
        apply_overrides({"method": "x"}, ["method.sub=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(CeloraError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("method = [unclosed")
    with pytest.raises(CeloraError, match="not valid TOML"):
        load_config(bad)


def test_dump_round_trip(tmp_path):
    cfg = load_config("configs/quickstart.toml", ["seed=3"])
    p = tmp_path / "c.toml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_adapter_section_is_another_name_for_the_adapter_keys(tmp_path):
    cfg = load_config(None, ["adapter.basis=svd", "adapter.rank=16", "adapter.train_ab=false"])
    assert (cfg.model.basis, cfg.model.rank, cfg.model.train_ab) == ("svd", 16, False)
    (tmp_path / "c.toml").write_text('[adapter]\nbasis = "svd"\n[model]\nname = "tiny-bert"\n')
    assert load_config(tmp_path / "c.toml").model.basis == "svd"
    with pytest.raises(CeloraError, match=r"adapter.rank and model.rank are the same setting"):
        load_config(None, ["adapter.rank=16", "model.rank=8"])
    with pytest.raises(CeloraError, match=r"adapter.name: unknown key \(adapter keys: rank"):
        load_config(None, ["adapter.name=minilm"])
    with pytest.raises(CeloraError, match=r"adapter.basis: .*'random' or 'svd'|model.basis"):
        load_config(None, ["adapter.basis=qr"])
    with pytest.raises(CeloraError, match=r"adapter: expected a section"):
        load_config(None, ["adapter=3"])
