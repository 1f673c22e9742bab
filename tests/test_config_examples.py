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


def test_the_kyma_config_names_no_credentials_and_finds_its_binding() -> None:
    import tomllib

    document = yaml.safe_load((ROOT / "deploy/kubernetes/kyma/configmap.yaml").read_text())
    config = config_from_dict(tomllib.loads(document["data"]["senderd.toml"]), source="kyma/configmap.yaml")
    assert config.credentials_set().source_key is None  # found below $SERVICE_BINDING_ROOT


def test_the_multi_tenant_example_has_a_set_per_tenant() -> None:
    config = load_config(ROOT / "config/multi-tenant.toml")
    assert list(config.credentials) == ["dev", "test", "prod"]
    assert {config.set_of(flow) for flow in config.flows} == {"dev", "test", "prod"}
    assert config.token_for("prod").timeout == 20.0 and config.token_for("dev").timeout == 10.0


def test_the_confirming_uptime_probe_reads_the_mpl_api_with_its_own_set() -> None:
    config = load_config(ROOT / "config/uptime-probe-confirmed.toml")
    assert config.api_sets == {"monitoring"}
    assert {config.set_of(flow) for flow in config.flows} == {"send"}  # no flow names its set: one sends
    assert all(flow.confirm == "mpl" and flow.message_ids == "auto" for flow in config.flows)
    assert [flow.confirm_timeout for flow in config.flows] == [60.0, 180.0]
