"""Every shipped config (config/*.toml and the Kubernetes ConfigMap) validates as senderd reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from senderd.config import config_from_dict, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_example_config_is_valid(path: Path) -> None:
    config = load_config(path)
    assert config.flows, "an example without flows shows nothing"


def test_configmap_config_is_valid() -> None:
    import tomllib

    document = yaml.safe_load((ROOT / "deploy/kubernetes/configmap.yaml").read_text())
    data = tomllib.loads(document["data"]["senderd.toml"])
    config = config_from_dict(data, source="configmap.yaml")
    assert config.server.listen == "0.0.0.0:9464"
    assert str(config.credentials_set().service_key) == "/etc/senderd/key/service-key.json"
