"""Config loading: YAML, env and --set overrides, clear errors naming the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest

from vggflow.config import Config, load_config
from vggflow.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_equals_built_in_defaults_and_spells_out_every_key():
    import yaml

    assert load_config(ROOT / "configs" / "default.yaml", environ={}) == Config()

    def keys(tree: dict, prefix: str = "") -> set[str]:
        found = set()
        for key, value in tree.items():
            found.add(prefix + key)
            if isinstance(value, dict):
                found |= keys(value, f"{prefix}{key}.")
        return found

    spelled_out = keys(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()))
    assert keys(Config().model_dump(mode="json")) - spelled_out == set()


def test_demo_config_allows_random_init_explicitly():
    cfg = load_config(ROOT / "configs" / "demo.yaml", environ={})
    assert cfg.backbone.allow_random_init and cfg.backbone.image_size == 32


def test_overrides_parse_yaml_values_and_win_over_env():
    cfg = load_config(
        None,
        ["head.epochs=7", "finetune.stages.0.learning_rate=3e-4", "registry.thresholds={macro_f1: 0.4}"],
        environ={"VGGFLOW__HEAD__EPOCHS": "3", "VGGFLOW__BACKBONE__IMAGE_SIZE": "64"},
    )
    assert cfg.head.epochs == 7
    assert cfg.backbone.image_size == 64
    assert cfg.finetune.stages[0].learning_rate == pytest.approx(3e-4)
    assert cfg.registry.thresholds == {"macro_f1": 0.4}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["head.epoks=3"], "head.epoks: unknown key"),
        (["head.epochs=zero"], "head.epochs"),
        (["backbone.image_size=16"], "backbone.image_size"),
        (["finetune.stages=[{unfreeze_from: block9, learning_rate: 0.1}]"], "finetune.stages.0.unfreeze_from"),
        (["finetune.stages.7.learning_rate=1"], "not an item of that list"),
        (["headepochs"], "expected section.key=value"),
        (["data.val_fraction=0.45", "data.test_fraction=0.45"], "at least 20% for training"),
    ],
)
def test_bad_values_are_reported_by_name(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, environ={})
    assert expected in str(err.value)


def test_bad_files_are_reported_by_path(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml", environ={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("head: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        load_config(broken, environ={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(scalar, environ={})


def test_yaml_is_parsed_safely(tmp_path):
    hostile = tmp_path / "hostile.yaml"
    hostile.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(hostile, environ={})


def test_duplicate_stage_names_are_refused():
    with pytest.raises(ConfigError, match="stage names must be unique"):
        load_config(
            None,
            ["finetune.stages=[{unfreeze_from: block5, learning_rate: 1}, {unfreeze_from: block5, learning_rate: 2}]"],
            environ={},
        )


def test_flat_params_cover_every_leaf():
    params = Config(
        finetune={
            "stages": [
                {"unfreeze_from": "block5", "learning_rate": 1e-3},
                {"unfreeze_from": "block4", "learning_rate": 3e-4},
            ]
        }
    ).flat_params()
    assert params["finetune.stages.1.unfreeze_from"] == "block4"
    assert params["registry.thresholds.accuracy"] == "0.5"
    assert params["tracking.uri"] == "sqlite:///mlflow/mlflow.db"
