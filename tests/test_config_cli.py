import pytest

from dualloop.cli import main as cli_main
from dualloop.config import ConfigError, load_config


def test_minimal_model_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {preset: tiny}\n")
    cfg = load_config(p)
    assert cfg.model.preset == "tiny" and cfg.model.lora.r == 128


def test_unknown_key_names_nearest(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {preset: tiny, lora: {rank: 4}}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.lora\.rank'"):
        load_config(p)
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_config(None, ["train.stepz=3"])


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=1e-4", "train.steps=7", "loop.caption_grad=gumbel"])
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.train.steps == 7 and cfg.loop.caption_grad == "gumbel"
    with pytest.raises(ConfigError, match="train.steps"):
        load_config(None, ["train.steps=many"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_usage_and_unknown(capsys):
    assert cli_main([]) == 0
    assert "verify-data" in capsys.readouterr().out
    assert cli_main(["frobnicate"]) == 2
