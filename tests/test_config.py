"""Config validation: the shipped configs are valid; mistakes get errors that name the key."""


import pytest
import yaml

from quari.config import ConfigError, deep_merge, load_config, validate_config
from tests.builders import ROOT

SCHEMA = ROOT / "workflow/schemas/config.schema.yaml"


def default_config():
    return yaml.safe_load((ROOT / "workflow/config/config.yaml").read_text())


def test_shipped_default_config_is_valid_and_gets_defaults():
    config = load_config(ROOT / "workflow/config/config.yaml", SCHEMA)
    assert config["evaluation"]["ilias"]["k"] == 1000
    assert config["mining"] == {"k": 100, "top_n": 2, "temperature": 0.07}
    assert config["device"] == "auto"


def test_typo_in_nested_key_is_named_with_a_suggestion():
    config = default_config()
    config["quari"]["model"]["num_layer"] = 3
    with pytest.raises(ConfigError) as err:
        validate_config(config, SCHEMA)
    message = str(err.value)
    assert "quari.model.num_layer" in message
    assert "did you mean 'num_layers'" in message


def test_wrong_type_and_range_name_the_key():
    config = default_config()
    config["evaluation"]["ilias"]["k"] = 0
    config["quari"]["model"]["variant"] = "dense"
    with pytest.raises(ConfigError) as err:
        validate_config(config, SCHEMA)
    assert "evaluation.ilias.k" in str(err.value)
    assert "quari.model.variant" in str(err.value)


def test_missing_required_key():
    config = default_config()
    del config["backbones"]
    with pytest.raises(ConfigError, match="backbones"):
        validate_config(config, SCHEMA)


def test_unknown_top_level_key():
    config = default_config()
    config["bakcbones"] = ["x"]
    with pytest.raises(ConfigError, match="did you mean 'backbones'"):
        validate_config(config, SCHEMA)


def test_deep_merge_overrides_nested_values_only():
    base = {"a": {"b": 1, "c": 2}, "d": 3}
    assert deep_merge(base, {"a": {"c": 5}}) == {"a": {"b": 1, "c": 5}, "d": 3}
    assert base["a"]["c"] == 2


def test_environment_yml_and_requirements_name_the_same_packages():
    req = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            req[name.lower().replace("_", "-")] = version
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                if "==" in line:
                    name, version = line.split("==")
                    conda[name.lower().replace("_", "-")] = version
        elif "=" in dep and not dep.startswith("python"):
            name, version = dep.split("=")
            conda[name.lower()] = version
    # the one intended difference: faiss-gpu in conda where pip uses faiss-cpu
    assert req.pop("faiss-cpu") == conda.pop("faiss-gpu")
    assert req == conda


def test_shipped_paper_config_is_valid():
    config = load_config(ROOT / "workflow/config/paper.yaml", SCHEMA)
    # the seven backbones of Table 1a, plus SigLIP SO400M of Table 2
    assert config["data"] == "real" and len(config["backbones"]) == 8
    assert "siglip-so400m14@384" in config["backbones"]
