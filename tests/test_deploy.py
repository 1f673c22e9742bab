"""The deployment artifacts, checked with the real tools: promtool (alert rules and their unit tests,
the dashboard's PromQL), kubernetes-validate (manifests, strict), hadolint (Dockerfile) and pip (the wheel
the Dockerfile builds).

A tool that is missing fails the test when CI=true and skips it otherwise (`require_tool`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from senderd.config import config_from_dict
from tests.deploy_names import (
    ALERTS,
    DOCUMENTED_METRICS,
    ROOT,
    load_alert_rules,
    load_dashboard,
    metric_names,
    metric_names_in_alerts,
    metric_names_in_dashboard,
)
from tests.tools import require_tool

ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
PROBE_SCRAPE = ROOT / "deploy" / "prometheus" / "probe-scrape.yml"
K8S = ROOT / "deploy" / "kubernetes"
UPTIME = K8S / "uptime-probe"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
IMAGE = f"ghcr.io/senderd/senderd:{VERSION}"
CONFIG_PATH = "/etc/senderd/senderd.toml"
SPOOL_DIR = "/var/lib/senderd/spool"
OLDEST_KUBERNETES = "1.29.0"  # native sidecars (init containers with restartPolicy: Always)


def run(*args: str | Path, cwd: Path = ROOT, timeout: float = 30) -> str:
    """Run a command, assert it succeeded, return its stdout and stderr together."""
    result = subprocess.run(
        [str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(map(str, args))} exited {result.returncode}:\n{output}"
    return output


# --- Prometheus alerts -------------------------------------------------------------------------------

REQUIRED_ALERTS = {
    "SenderdFlowDown": None,
    "SenderdErrorRatioHigh": None,
    "SenderdAuthFailures": None,
    "SenderdTokenRefreshFailing": None,
    "SenderdTokenExpiringWithoutRefresh": "critical",
    "SenderdClientCertificateExpiresSoon": "warning",
    "SenderdClientCertificateExpiresVerySoon": "critical",
    "SenderdScheduleLagHigh": None,
    "SenderdNoValidToken": "critical",
    "SenderdTargetDown": "critical",
    "SenderdRelayDeadLetters": None,
    "SenderdRelayOldestMessageWaiting": None,
    "SenderdSpoolNearlyFull": None,
    "SenderdOnceRunFailed": None,
    "SenderdOnceRunMissing": None,
}
RUNBOOK = ROOT / "docs" / "runbook.md"


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in load_alert_rules() if "alert" in rule}


def test_alert_rules_pass_promtool_check() -> None:
    promtool = require_tool("promtool")
    output = run(promtool, "check", "rules", ALERTS)
    assert "SUCCESS" in output


def test_alert_unit_tests_pass() -> None:
    promtool = require_tool("promtool")
    output = run(promtool, "test", "rules", ALERTS_TEST)
    assert "SUCCESS" in output


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases: dict[str, list[int]] = {}
    for test in yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], []).append(len(case.get("exp_alerts") or []))
    for name in alerts():
        counts = cases.get(name, [])
        assert any(count > 0 for count in counts), f"{name}: no unit test where it fires"
        assert any(count == 0 for count in counts), f"{name}: no unit test where it stays quiet"


def test_alerts_have_severity_annotations_and_a_for_duration() -> None:
    rules = alerts()
    assert set(REQUIRED_ALERTS) <= set(rules), f"missing alerts: {set(REQUIRED_ALERTS) - set(rules)}"
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert REQUIRED_ALERTS.get(name) in {None, rule["labels"]["severity"]}, name
        for key in ("summary", "description", "runbook", "runbook_url"):
            assert str(rule["annotations"].get(key, "")).strip(), f"{name}: no {key} annotation"
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no `for` duration"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of `markdown`: lower case, punctuation dropped, spaces to `-`."""
    anchors = set()
    for line in markdown.splitlines():
        heading = re.match(r"#{1,6} (.+)", line)
        if heading:
            anchors.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return anchors


def test_github_anchors_follow_githubs_rules() -> None:
    assert github_anchors("# Title\n## Rotating a service key, or binding\ntext\n### SenderdFlowDown\n") == {
        "title", "rotating-a-service-key-or-binding", "senderdflowdown",
    }  # fmt: skip


def test_every_alert_links_its_own_section_of_the_runbook() -> None:
    source = re.search(r'image\.source="([^"]+)"', DOCKERFILE.read_text(encoding="utf-8"))
    assert source, "the Dockerfile names the repository (org.opencontainers.image.source)"
    base = f"{source[1]}/blob/main/docs/runbook.md#"
    runbook = RUNBOOK.read_text(encoding="utf-8")
    anchors = github_anchors(runbook)
    for name, rule in alerts().items():
        url = rule["annotations"]["runbook_url"]
        assert url == base + name.lower(), f"{name}: runbook_url {url!r} is not {base + name.lower()!r}"
        assert name.lower() in anchors, f"{name}: docs/runbook.md has no section '## {name}'"
        section = runbook.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        for part in ("**Means.**", "**Check", "Fix"):
            assert part in section, f"{name}: its runbook section lacks {part}"
    links = set(re.findall(r"\]\(#([^)]+)\)", runbook))
    assert links - anchors == set(), "links to sections that do not exist"


def test_once_run_missing_threshold_is_twice_the_cronjobs_schedule() -> None:
    schedule = one("cronjob.yaml", "CronJob")["spec"]["schedule"]
    every = re.fullmatch(r"\*/(\d+) \* \* \* \*", schedule)
    assert every, f"the test understands '*/N * * * *' schedules only: {schedule!r}"
    expr = " ".join(str(alerts()["SenderdOnceRunMissing"]["expr"]).split())
    assert expr == f"time() - senderd_once_last_run_timestamp_seconds > 2 * {int(every[1]) * 60}"
    assert f"2 * {int(every[1]) * 60}" in RUNBOOK.read_text(encoding="utf-8"), "the runbook names the threshold"


def test_readme_lists_every_alert_and_documents_every_metric() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Alerts and dashboard\n", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"^\| `(Senderd\w+)`", section, re.MULTILINE))
    listed |= {name.replace("Soon", "VerySoon") for name in listed if name.endswith("ExpiresSoon")}  # `…VerySoon`
    assert listed == set(alerts()), f"README alerts table: {sorted(listed ^ set(alerts()))}"
    assert "docs/runbook.md" in section
    undocumented = {name for name in DOCUMENTED_METRICS if f"`{name}" not in readme}
    assert undocumented == set(), f"not in README: {sorted(undocumented)}"


def test_flow_down_compares_time_since_success_with_three_intervals() -> None:
    expr = alerts()["SenderdFlowDown"]["expr"]
    assert "time() - (senderd_last_success_timestamp_seconds" in expr
    assert "> 3 * senderd_flow_interval_seconds" in expr


# --- metric names --------------------------------------------------------------------------------------


def test_metric_names_strip_histogram_suffixes() -> None:
    expr = (
        "histogram_quantile(0.99, rate(senderd_send_duration_seconds_bucket[5m])) "
        "+ senderd_token_fetch_duration_seconds_sum / senderd_token_fetch_duration_seconds_count "
        "+ on() xsenderd_not_ours"
    )
    assert metric_names(expr) == {"senderd_send_duration_seconds", "senderd_token_fetch_duration_seconds"}


def test_dashboard_uses_only_public_metric_names() -> None:
    names = metric_names_in_dashboard()
    assert names - DOCUMENTED_METRICS == set()
    needed = {
        "senderd_sends_total",
        "senderd_last_success_timestamp_seconds",
        "senderd_send_duration_seconds",
        "senderd_send_attempts_total",
        "senderd_auth_failures_total",
        "senderd_token_expiry_timestamp_seconds",
        "senderd_client_certificate_expiry_timestamp_seconds",
        "senderd_schedule_lag_seconds",
        "senderd_skipped_ticks_total",
        "senderd_inflight_sends",
        "senderd_confirmations_total",
        "senderd_spool_messages",
        "senderd_spool_oldest_message_age_seconds",
        "senderd_spool_bytes",
        "senderd_spool_capacity_bytes",
        "senderd_spool_capacity_messages",
        "senderd_relay_requests_total",
        "senderd_relay_deliveries_total",
        "senderd_forward_requests_total",
        "senderd_forward_duration_seconds",
    }
    assert needed - names == set(), "panels missing from the dashboard"


def test_alerts_use_only_public_metric_names() -> None:
    names = metric_names_in_alerts()
    assert names - DOCUMENTED_METRICS == set()
    assert {
        "senderd_last_success_timestamp_seconds",
        "senderd_flow_interval_seconds",
        "senderd_client_certificate_expiry_timestamp_seconds",
        "senderd_credentials_ready",
        "senderd_spool_messages",
        "senderd_spool_oldest_message_age_seconds",
        "senderd_spool_bytes",
        "senderd_spool_capacity_bytes",
        "senderd_spool_capacity_messages",
        "senderd_once_last_run_success",
        "senderd_once_last_run_timestamp_seconds",
    } <= names
    prose = " ".join(str(text) for rule in load_alert_rules() for text in rule.get("annotations", {}).values())
    assert metric_names(prose) - DOCUMENTED_METRICS == set(), "annotations name metrics that do not exist"
    runbook = RUNBOOK.read_text(encoding="utf-8")
    assert metric_names(runbook) - DOCUMENTED_METRICS == set(), "the runbook names metrics that do not exist"


# --- Grafana dashboard ---------------------------------------------------------------------------------

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] and dashboard["title"]
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "job", "instance", "flow", "credentials"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    queries = {
        "namespace": "label_values(senderd_build_info, namespace)",
        "job": 'label_values(senderd_build_info{namespace=~"$namespace"}, job)',
        "instance": 'label_values(senderd_build_info{namespace=~"$namespace", job=~"$job"}, instance)',
        "flow": f"label_values(senderd_sends_total{{{TARGET_MATCHERS}}}, flow)",
        "credentials": f"label_values(senderd_token_fetches_total{{{TARGET_MATCHERS}}}, credentials)",
    }
    for name, query in queries.items():
        variable = variables[name]
        assert variable["type"] == "query", name
        assert variable["datasource"] == DATASOURCE, name
        assert variable["definition"] == variable["query"]["query"] == query, name
        assert variable["multi"] is True, name
        assert variable["includeAll"] is True, name
        assert variable["allValue"] == ".*", name  # also matches series without the label (no namespace)

    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    assert rows == [
        "Flows", "Credentials and tokens", "Scheduling and instances", "Relay and spool", "Forwarding",
        "Delivery confirmations",
    ]  # fmt: skip
    occupied: set[tuple[int, int]] = set()
    for panel in panels:
        title = panel["title"]
        if panel["type"] == "row":
            assert panel["collapsed"] is False and panel["panels"] == [], title  # its panels follow it
            assert panel["gridPos"] == {"h": 1, "w": 24, "x": 0, "y": panel["gridPos"]["y"]}, title
        else:
            assert panel["datasource"] == DATASOURCE, title
            assert panel["targets"], title
        ref_ids = [target["refId"] for target in panel.get("targets", [])]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel.get("targets", []):
            assert target["datasource"] == DATASOURCE, title
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, title
        cells = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & occupied, f"{title} overlaps another panel"
        occupied |= cells


FLOW_METRICS = {
    "senderd_send_duration_seconds",
    "senderd_sends_total",
    "senderd_send_attempts_total",
    "senderd_last_success_timestamp_seconds",
    "senderd_schedule_lag_seconds",
    "senderd_skipped_ticks_total",
    "senderd_flow_interval_seconds",
    "senderd_confirmations_total",
    "senderd_confirmation_duration_seconds",
    "senderd_relay_deliveries_total",
}
CREDENTIALS_METRICS = {
    "senderd_auth_failures_total",
    "senderd_token_fetches_total",
    "senderd_token_fetch_duration_seconds",
    "senderd_token_expiry_timestamp_seconds",
    "senderd_client_certificate_expiry_timestamp_seconds",
    "senderd_credentials_rotations_total",
}
TARGET_MATCHERS = 'namespace=~"$namespace", job=~"$job", instance=~"$instance"'


def dashboard_selectors() -> list[tuple[str, str, str]]:
    """(panel title, metric family, its label matchers) for every senderd selector of every panel query."""
    selectors = re.compile(r"(senderd_[a-z_]+)(\{[^}]*\})?")
    return [
        (panel["title"], name, match[2] or "")
        for panel in load_dashboard()["panels"]
        for target in panel.get("targets", [])
        for match in selectors.finditer(target["expr"])
        for name in metric_names(match[1])
    ]


def test_dashboard_queries_follow_the_target_flow_and_credentials_variables() -> None:
    selectors = dashboard_selectors()
    assert len(selectors) > 40
    for title, name, matchers in selectors:
        assert matchers.startswith("{" + TARGET_MATCHERS), f"{title}: {name}{matchers}"
        if name in FLOW_METRICS:
            assert 'flow=~"$flow"' in matchers, f"{title}: {name}{matchers}"
        if name in CREDENTIALS_METRICS:
            assert 'credentials=~"$credentials"' in matchers, f"{title}: {name}{matchers}"


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses every panel query (with Grafana's variables replaced by plausible values)."""
    promtool = require_tool("promtool")
    substitutions = {
        "$__rate_interval": "2m", "$__interval": "1m", "$__range": "6h", "${flow}": ".*", "$flow": ".*",
        "$credentials": ".*", "$namespace": ".*", "$job": ".*", "$instance": ".*",
    }  # fmt: skip
    rules = []
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in substitutions.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unhandled variable in {target['expr']!r}"
            rules.append({"record": f"dashboard:panel{panel['id']}_{target['refId']}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    output = run(promtool, "check", "rules", path)
    assert f"SUCCESS: {len(rules)} rules found" in output


# --- Kubernetes ------------------------------------------------------------------------------------------


def k8s_documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")) if doc]


def kustomization_resources() -> list[str]:
    resources: list[str] = k8s_documents("kustomization.yaml")[0]["resources"]
    return resources


def one(name: str, kind: str) -> dict[str, Any]:
    docs = [doc for doc in k8s_documents(name) if doc["kind"] == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}"
    return docs[0]


def deployment_pod() -> dict[str, Any]:
    pod: dict[str, Any] = one("sidecar-deployment.yaml", "Deployment")["spec"]["template"]
    return pod


def cronjob_pod() -> dict[str, Any]:
    pod: dict[str, Any] = one("cronjob.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"]
    return pod


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def senderd_container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in containers(pod_spec) if c["image"].startswith("ghcr.io/senderd/senderd:")]
    assert len(found) == 1
    return found[0]


ALTERNATIVES = ("sidecar-statefulset.yaml",)
"""Manifests applied instead of one the kustomization lists (not beside it): validated all the same."""
KYMA = ("kyma/configmap.yaml", "kyma/sidecar-deployment.yaml")
"""The Kyma manifests kubernetes-validate knows (the service operator's ServiceInstance/Binding are CRDs)."""


def test_kustomization_lists_every_manifest_but_the_example_secret_and_the_alternatives() -> None:
    kustomization = k8s_documents("kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(kustomization_resources()) == sorted(on_disk - set(ALTERNATIVES))
    assert set(ALTERNATIVES) <= on_disk
    example = (K8S / "secret.example.yaml").read_text(encoding="utf-8")
    assert "kubectl create secret generic senderd-service-key" in example
    assert "--from-file=service-key.json=" in example


@pytest.mark.parametrize("kubernetes_version", [None, OLDEST_KUBERNETES])
def test_manifests_validate_strictly(kubernetes_version: str | None) -> None:
    validate = require_tool("kubernetes-validate")
    files = [name for name in kustomization_resources() if name != "podmonitor.yaml"]
    files += ["secret.example.yaml", *ALTERNATIVES, *KYMA]
    files += [f"uptime-probe/{name}" for name in uptime_resources()]
    version = ["-k", kubernetes_version] if kubernetes_version else []
    output = run(validate, "--strict", *version, *(K8S / name for name in files))
    documents = sum(len(k8s_documents(name)) for name in files)
    assert output.count(" passed for resource ") == documents, output
    assert "WARN" not in output and "ERROR" not in output, output


def test_strict_validation_rejects_unknown_fields(tmp_path: Path) -> None:
    """Guards the test above: kubernetes-validate --strict really fails on a misspelt field."""
    validate = require_tool("kubernetes-validate")
    deployment = one("sidecar-deployment.yaml", "Deployment")
    deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRot"] = True
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(deployment), encoding="utf-8")
    result = subprocess.run([validate, "--strict", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode != 0
    assert "runAsNonRot" in result.stdout + result.stderr


def test_pod_monitor_scrapes_the_sidecars_metrics_port() -> None:
    monitor = one("podmonitor.yaml", "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert monitor["metadata"]["name"]
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
    pod_labels = deployment_pod()["metadata"]["labels"]
    selector = spec["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items(), "the selector does not match the pods"
    endpoint_keys = {
        "port",
        "path",
        "interval",
        "scrapeTimeout",
        "scheme",
        "honorLabels",
        "relabelings",
        "metricRelabelings",
    }
    ports = {
        port["name"]: port["containerPort"]
        for container in containers(deployment_pod()["spec"])
        for port in container.get("ports", [])
    }
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= endpoint_keys, f"unknown PodMetricsEndpoint fields: {set(endpoint) - endpoint_keys}"
        assert endpoint["port"] == "metrics"
        assert endpoint.get("path", "/metrics") == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"])
    assert ports["metrics"] == 9464


def statefulset() -> dict[str, Any]:
    return one("sidecar-statefulset.yaml", "StatefulSet")


def statefulset_pod() -> dict[str, Any]:
    pod: dict[str, Any] = statefulset()["spec"]["template"]
    return pod


@pytest.mark.parametrize(
    "pod", [deployment_pod, statefulset_pod, cronjob_pod], ids=["deployment", "statefulset", "cronjob"]
)
def test_workloads_are_hardened(pod: Any) -> None:
    spec = pod()["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in containers(spec):
        name = container["name"]
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, name
        assert context["readOnlyRootFilesystem"] is True, name
        assert context["allowPrivilegeEscalation"] is False, name
        assert context["capabilities"] == {"drop": ["ALL"]}, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) >= {"cpu", "memory"}, f"{name}: {kind}"
    senderd = senderd_container(spec)
    assert senderd["image"] == IMAGE
    mounts = {mount["mountPath"]: mount for mount in senderd["volumeMounts"]}
    assert mounts["/etc/senderd"].get("readOnly") is True
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    sources = volumes[mounts["/etc/senderd"]["name"]]["projected"]["sources"]
    config = next(source["configMap"] for source in sources if "configMap" in source)
    secret = next(source["secret"] for source in sources if "secret" in source)
    assert config["name"] == one("configmap.yaml", "ConfigMap")["metadata"]["name"]
    assert config["items"] == [{"key": "senderd.toml", "path": "senderd.toml"}]
    assert secret["name"] == one("secret.example.yaml", "Secret")["metadata"]["name"]
    assert secret["items"] == [{"key": "service-key.json", "path": "key/service-key.json"}]


SPOOL_PARENT = str(PurePosixPath(SPOOL_DIR).parent)
"""Where the spool's volume is mounted: senderd makes the spool directory below it itself (0700, its uid),
which fsGroup's group permissions on a volume's root would otherwise open."""


def sidecar_checks(pod: dict[str, Any]) -> dict[str, Any]:
    """The checks every sidecar pod passes; returns the volume the spool lives on."""
    assert len(containers(pod)) == 2, "an app container and the senderd sidecar"
    senderd = senderd_container(pod)
    assert senderd["args"][:3] == ["run", "-c", CONFIG_PATH]
    assert senderd in pod.get("initContainers", []) and senderd["restartPolicy"] == "Always"
    assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in senderd["ports"]
    assert senderd["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # ready = taking relay and forward requests; never the token (/readyz/token), whose outage the relay absorbs
    assert senderd["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert senderd["startupProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {mount["mountPath"]: mount["name"] for mount in senderd["volumeMounts"]}
    assert SPOOL_DIR not in mounts
    volume_name = mounts[SPOOL_PARENT]
    volumes: dict[str, dict[str, Any]] = {volume["name"]: volume for volume in pod.get("volumes", [])}
    return volumes.get(volume_name, {"name": volume_name})


@pytest.mark.parametrize("name", ["sidecar-deployment.yaml", "kyma/sidecar-deployment.yaml"])
def test_sidecar_serves_probes_and_metrics_and_says_its_empty_dir_spool_is_lost(name: str) -> None:
    pod = one(name, "Deployment")["spec"]["template"]["spec"]
    assert "emptyDir" in sidecar_checks(pod)
    text = (K8S / name).read_text(encoding="utf-8")
    comment = text[: text.index("emptyDir:\n            sizeLimit: 256Mi")].rsplit("- name: tmp", 1)[-1]
    assert "LOST AT EVERY POD DELETION" in comment, "said plainly where the emptyDir spool is configured"
    assert "sidecar-statefulset.yaml" in comment and "gateway mode" in comment


def test_statefulset_keeps_the_spool_on_a_claim_of_its_own_per_pod() -> None:
    workload = statefulset()
    pod = workload["spec"]["template"]
    assert "emptyDir" not in sidecar_checks(pod["spec"])
    claim_name = next(
        m["name"] for m in senderd_container(pod["spec"])["volumeMounts"] if m["mountPath"] == SPOOL_PARENT
    )
    claims = {claim["metadata"]["name"]: claim["spec"] for claim in workload["spec"]["volumeClaimTemplates"]}
    assert claims[claim_name]["accessModes"] == ["ReadWriteOnce"]
    assert claims[claim_name]["resources"]["requests"]["storage"]
    assert workload["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert pod["spec"]["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    service = one("sidecar-statefulset.yaml", "Service")
    assert service["metadata"]["name"] == workload["spec"]["serviceName"]
    assert service["spec"]["clusterIP"] == "None"
    # the same containers as the Deployment's but for the spool's volume: one example, not two that drift apart
    deployment = deployment_pod()["spec"]
    for key in ("initContainers", "containers"):
        assert without_spool_mount(pod["spec"][key]) == without_spool_mount(deployment[key]), key


def without_spool_mount(pod_containers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {**c, "volumeMounts": [m for m in c.get("volumeMounts", []) if m["mountPath"] != SPOOL_PARENT]}
        for c in pod_containers
    ]


def secret_mounts_through_sub_path(document: dict[str, Any]) -> list[str]:
    """Mounts of a Secret (a secret volume, or a projected one with a secret source) through `subPath` or
    `subPathExpr` in any workload of `document`: such a file never sees the Secret's updates."""
    spec = document.get("spec") or {}
    if document.get("kind") == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    pod = spec if document.get("kind") == "Pod" else (spec.get("template") or {}).get("spec") or {}
    secret_volumes = {
        volume["name"]
        for volume in pod.get("volumes", [])
        if "secret" in volume or any("secret" in source for source in volume.get("projected", {}).get("sources", []))
    }
    return [
        f"{document['kind']} {document['metadata']['name']}: container {container['name']} mounts "
        f"{mount['name']} at {mount['mountPath']} through subPath"
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]
        for mount in container.get("volumeMounts", [])
        if mount["name"] in secret_volumes and ("subPath" in mount or "subPathExpr" in mount)
    ]


def test_no_manifest_mounts_a_secret_through_sub_path() -> None:
    manifests = sorted(K8S.rglob("*.yaml"))
    assert len(manifests) >= 10
    found = [
        f"{path.relative_to(K8S)}: {problem}"
        for path in manifests
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if document
        for problem in secret_mounts_through_sub_path(document)
    ]
    assert found == [], "mount the Secret as a directory (subPath never updates):\n" + "\n".join(found)


@pytest.mark.parametrize("volume", ["secret", "projected"])
def test_the_sub_path_check_finds_a_secret_mounted_through_sub_path(volume: str) -> None:
    """Guards the test above on every kind of workload it reads."""
    for name, kind in (("sidecar-deployment.yaml", "Deployment"), ("sidecar-statefulset.yaml", "StatefulSet"),
                       ("cronjob.yaml", "CronJob"), ("kyma/sidecar-deployment.yaml", "Deployment")):  # fmt: skip
        document = one(name, kind)
        pod = document["spec"]["jobTemplate"]["spec"]["template"] if kind == "CronJob" else document["spec"]["template"]
        pod = pod["spec"]
        senderd = senderd_container(pod)
        if volume == "secret":
            pod["volumes"].append({"name": "key", "secret": {"secretName": "senderd-service-key"}})
            senderd["volumeMounts"].append({"name": "key", "mountPath": "/etc/key.json", "subPath": "key.json"})
        else:
            projected = next(v for v in pod["volumes"] if "projected" in v or "secret" in v)
            senderd["volumeMounts"].append({"name": projected["name"], "mountPath": "/x", "subPath": "senderd.toml"})
        assert len(secret_mounts_through_sub_path(document)) == 1, f"{name}: {volume}"


def test_cronjob_runs_once_and_pushes_without_overlap() -> None:
    cronjob = one("cronjob.yaml", "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert 0 <= job["backoffLimit"] <= 2
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    args = senderd_container(job["template"]["spec"])["args"]
    assert args[:5] == ["once", "-c", CONFIG_PATH, "--push-gateway", "http://pushgateway:9091"]
    # a stable grouping key: one Pushgateway group per CronJob, replaced at every run
    assert args[args.index("--push-instance") + 1] == cronjob["metadata"]["name"]


def test_configmap_config_matches_the_mounts() -> None:
    config = tomllib.loads(one("configmap.yaml", "ConfigMap")["data"]["senderd.toml"])
    assert config["credentials"]["service_key"] == "/etc/senderd/key/service-key.json"
    assert config["server"]["listen"] == "0.0.0.0:9464"
    assert config["relay"] == {"listen": "127.0.0.1:8787", "spool_dir": SPOOL_DIR}
    assert config["flows"], "at least one flow"
    for flow in config["flows"]:
        assert flow["name"] and flow["path"].startswith("/http/")
        assert ("every" in flow) != ("cron" in flow)


# --- Uptime probe: the Deployment, its NetworkPolicy, and Prometheus' multi-target scrape of /probe ------


def uptime_resources() -> list[str]:
    resources: list[str] = k8s_documents("uptime-probe/kustomization.yaml")[0]["resources"]
    return resources


def uptime(kind: str) -> dict[str, Any]:
    return one(f"uptime-probe/{kind.lower()}.yaml", kind)


def probe_jobs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(PROBE_SCRAPE.read_text(encoding="utf-8"))
    assert set(config) == {"scrape_configs"}, "only scrape jobs, to merge into a prometheus.yml"
    return {job["job_name"]: job for job in config["scrape_configs"]}


def uptime_config() -> Any:
    return config_from_dict(tomllib.loads(uptime("ConfigMap")["data"]["senderd.toml"]), source="uptime-probe")


def test_uptime_kustomization_lists_every_manifest_in_its_namespace() -> None:
    kustomization = k8s_documents("uptime-probe/kustomization.yaml")[0]
    assert sorted(uptime_resources()) == sorted(p.name for p in UPTIME.glob("*.yaml") if p.name != "kustomization.yaml")
    assert kustomization["namespace"] == uptime("Namespace")["metadata"]["name"]
    assert "create secret generic senderd-service-key" in (UPTIME / "kustomization.yaml").read_text(encoding="utf-8")


def test_probe_scrape_config_passes_promtool_check() -> None:
    promtool = require_tool("promtool")
    output = run(promtool, "check", "config", PROBE_SCRAPE)
    assert "SUCCESS" in output and "valid prometheus config" in output


def test_probe_scrape_is_the_multi_target_pattern_over_the_flows_marked_probe() -> None:
    jobs = probe_jobs()
    service = uptime("Service")
    address = f"{service['metadata']['name']}.{uptime('Namespace')['metadata']['name']}.svc:9464"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9464, "targetPort": "metrics", "protocol": "TCP"}]
    metrics = jobs["senderd-uptime-probe"]
    assert metrics["metrics_path"] == "/metrics"
    assert metrics["static_configs"] == [{"targets": [address]}]
    probe = jobs["senderd-probe"]
    assert probe["metrics_path"] == "/probe"
    assert probe["relabel_configs"] == [
        {"source_labels": ["__address__"], "target_label": "__param_flow"},
        {"source_labels": ["__param_flow"], "target_label": "instance"},
        {"source_labels": ["__param_flow"], "target_label": "flow"},
        {"target_label": "__address__", "replacement": address},
    ]
    flows = uptime_config().flows
    probed = [flow for flow in flows if flow.probe]
    assert probed and len(probed) < len(flows), "probe flows, and a scheduled one that is not probed"
    assert probe["static_configs"] == [{"targets": [flow.name for flow in probed]}]
    timeout = int(probe["scrape_timeout"].removesuffix("s"))
    assert all(flow.timeout < timeout for flow in probed), "a probe must end within the scrape's timeout"
    assert f'job="{probe["job_name"]}"' in alerts()["SenderdProbeFailing"]["expr"]


def test_uptime_probe_gates_readiness_on_the_token_and_is_hardened() -> None:
    deployment = uptime("Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 10001
    (senderd,) = spec["containers"]
    assert senderd["image"] == IMAGE
    assert senderd["args"][:3] == ["run", "-c", CONFIG_PATH]
    assert senderd["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    assert senderd["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert senderd["readinessProbe"]["httpGet"] == {"path": "/readyz/token", "port": "metrics"}
    context = senderd["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert set(senderd["resources"]["limits"]) >= {"cpu", "memory"}
    sources = {volume["name"]: volume for volume in spec["volumes"]}["senderd-etc"]["projected"]["sources"]
    assert {"configMap": {"name": uptime("ConfigMap")["metadata"]["name"],
                          "items": [{"key": "senderd.toml", "path": "senderd.toml"}]}} in sources  # fmt: skip
    service = uptime("Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    config = uptime_config()
    assert config.server.listen == "0.0.0.0:9464"
    assert config.relay is None and config.forward is None, "a probe takes no messages"


def test_uptime_network_policy_admits_only_prometheus_to_the_metrics_port() -> None:
    policy = uptime("NetworkPolicy")["spec"]
    pod_labels = uptime("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [
        {
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "ports": [{"port": "metrics", "protocol": "TCP"}],
        }
    ]


# --- Kubernetes: gateway mode ----------------------------------------------------------------------------

GATEWAY = K8S / "gateway"
GATEWAY_EXAMPLES = ("secret.example.yaml", "statefulset-sharded.example.yaml")


def gateway_documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((GATEWAY / name).read_text(encoding="utf-8")) if doc]


def gateway_one(kind: str) -> dict[str, Any]:
    docs = [doc for path in sorted(GATEWAY.glob("*.yaml")) for doc in gateway_documents(path.name)]
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"gateway: expected one {kind}, found {len(found)}"
    return found[0]


def gateway_config() -> dict[str, Any]:
    config: dict[str, Any] = tomllib.loads(gateway_one("ConfigMap")["data"]["senderd.toml"])
    return config


def test_gateway_kustomization_lists_every_manifest_but_the_examples() -> None:
    kustomization = gateway_documents("kustomization.yaml")[0]
    on_disk = {path.name for path in GATEWAY.glob("*.yaml")} - {"kustomization.yaml", *GATEWAY_EXAMPLES}
    assert sorted(kustomization["resources"]) == sorted(on_disk)


@pytest.mark.parametrize("kubernetes_version", [None, OLDEST_KUBERNETES])
def test_gateway_manifests_validate_strictly(kubernetes_version: str | None) -> None:
    validate = require_tool("kubernetes-validate")
    files = [*gateway_documents("kustomization.yaml")[0]["resources"], *GATEWAY_EXAMPLES]
    version = ["-k", kubernetes_version] if kubernetes_version else []
    output = run(validate, "--strict", *version, *(GATEWAY / name for name in files))
    documents = sum(len(gateway_documents(name)) for name in files)
    assert output.count(" passed for resource ") == documents, output
    assert "WARN" not in output and "ERROR" not in output, output


def test_gateway_replicas_share_a_database_and_require_the_relay_token() -> None:
    deployment = gateway_one("Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    senderd = senderd_container(pod["spec"])
    assert senderd["image"] == IMAGE and senderd["args"][:3] == ["run", "-c", CONFIG_PATH]
    config = gateway_config()
    relay = config["relay"]
    assert relay["store"] == "postgresql" and relay["listen"] == "0.0.0.0:8787"
    env = {item["name"]: item for item in senderd["env"]}
    secret = gateway_documents("secret.example.yaml")[0]
    for variable in (relay["dsn_env"], relay["token_env"]):  # both from the Secret, never in the manifest
        reference = env[variable]["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"]
        assert reference["key"] in secret["stringData"]
        assert "value" not in env[variable]
    assert not any(volume.get("emptyDir") and volume["name"] == "spool" for volume in pod["spec"]["volumes"])
    ports = {port["name"]: port["containerPort"] for port in senderd["ports"]}
    assert ports == {"relay": 8787, "metrics": 9464}
    assert senderd["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    labels = pod["metadata"]["labels"]

    service = gateway_one("Service")
    assert service["metadata"]["name"] == "senderd-gateway"
    assert service["spec"]["ports"] == [{"name": "relay", "port": 8787, "targetPort": "relay", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= labels.items()
    budget = gateway_one("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"].get("maxUnavailable") == 1
    autoscaler = gateway_one("HorizontalPodAutoscaler")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert autoscaler["spec"]["minReplicas"] >= 2
    policy = gateway_one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    allowed_in = {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    allowed_out = {port["port"] for rule in policy["spec"]["egress"] for port in rule["ports"]}
    assert allowed_in == {8787, 9464} and {53, 5432, 443} <= allowed_out


def test_gateway_workloads_are_hardened() -> None:
    for pod in (
        gateway_one("Deployment")["spec"]["template"]["spec"],
        gateway_one("StatefulSet")["spec"]["template"]["spec"],
    ):
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in containers(pod):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"] == {"drop": ["ALL"]}


def test_the_gateway_config_loads_and_without_its_token_is_refused_at_start(tmp_path: Path) -> None:
    from senderd.config import config_from_dict

    config = gateway_config()
    loaded = config_from_dict(config, source="gateway", base=tmp_path)
    assert loaded.relay is not None and loaded.relay.store == "postgresql"
    del config["relay"]["token_env"]
    path = tmp_path / "open.toml"
    path.write_text(toml_text(config), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "senderd", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"senderd: error: {path}: relay: listen = '0.0.0.0:8787' is reachable beyond localhost without a token: "
        "set relay.token_env (the app then sends 'Authorization: Bearer ...'), or listen on 127.0.0.1"
    ]


def toml_text(config: dict[str, Any]) -> str:
    """The gateway's config (tables of strings, numbers and arrays of tables) written back as TOML."""
    lines: list[str] = []
    for section, value in config.items():
        tables = value if isinstance(value, list) else [value]
        for table in tables:
            lines.append(f"[[{section}]]" if isinstance(value, list) else f"[{section}]")
            lines += [f"{key} = {json.dumps(item)}" for key, item in table.items()]
    return "\n".join(lines) + "\n"


# --- Dockerfile -----------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One build stage: its base image, its name, and its instructions as (INSTRUCTION, arguments)."""

    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages of a Dockerfile: comments dropped, continuation lines joined (the default escape `\\`)."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not current):
            continue
        if line.endswith("\\"):
            current += line[:-1].rstrip() + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction, args = instruction.upper(), args.strip()
        if instruction == "FROM":
            words = [word for word in args.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"  # global build arguments
        else:
            stages[-1].instructions.append((instruction, args))
    return stages


def global_args(text: str) -> dict[str, str]:
    """The `ARG NAME=default` lines before the first FROM (what `${NAME}` in a FROM line expands to)."""
    found = {}
    for line in text.splitlines():
        if line.upper().startswith("FROM"):
            break
        if line.upper().startswith("ARG "):
            name, _, default = line[4:].strip().partition("=")
            found[name] = default
    return found


COMPILERS = {"gcc", "g++", "cc", "clang", "build-essential", "make", "python3-dev", "libc6-dev"}


def test_dockerfile_passes_hadolint() -> None:
    hadolint = require_tool("hadolint")
    run(hadolint, "--no-color", "--failure-threshold", "info", DOCKERFILE)


def test_dockerfile_builds_a_wheel_and_installs_only_that_as_a_non_root_user() -> None:
    stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    assert len(stages) >= 2, "multi-stage"
    builder, final = stages[0], stages[-1]
    assert {stage.base for stage in stages} == {"${PYTHON_IMAGE}"}, "every stage from the one pinned base"
    base = global_args(DOCKERFILE.read_text(encoding="utf-8"))["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", base), f"the base image by digest: {base}"
    assert "requirements.lock /dist/" in builder.args("COPY")
    assert builder.name
    assert any(re.search(r"\bpip wheel\b.*--no-deps.*-w /dist \.$", run_) for run_ in builder.args("RUN"))

    assert final.name is None
    assert final.args("USER") == ["10001"]
    assert [json.loads(args) for args in final.args("ENTRYPOINT")] == [["senderd"]]
    assert [json.loads(args) for args in final.args("CMD")] == [["run", "-c", CONFIG_PATH]]
    exposed = {port for args in final.args("EXPOSE") for port in args.split()}
    assert {"9464", "8787"} <= exposed
    assert any("--uid 10001" in args for args in final.args("RUN")), "a user with uid 10001"
    for copy in final.args("COPY") + final.args("ADD"):
        assert f"--from={builder.name}" in copy, f"sources copied into the final stage: {copy}"
    assert f"--from={builder.name} /dist /tmp/dist" in final.args("COPY")  # copied: its checksum keys the cache
    installs = [args for args in final.args("RUN") if "pip install" in args]
    assert installs and all(args.endswith(" /tmp/dist/*.whl") for args in installs)
    with (ROOT / "pyproject.toml").open("rb") as file:
        extra = tomllib.load(file)["project"]["optional-dependencies"]["postgresql"]
    carried = {re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0] for requirement in extra}
    assert all(f"'{name}'" in installs[0] for name in carried), "the image carries the postgresql extra"
    assert all("-c /tmp/dist/requirements.lock" in args for args in installs), "dependencies from the lock"
    for args in final.args("RUN"):
        words = set(re.split(r"[\s;&|]+", args))
        assert not words & COMPILERS, f"build tools in the final stage: {args}"


def test_dockerfile_parser_reads_continuations_and_stages() -> None:
    stages = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nFROM a:1 AS b\nRUN x \\\n  # note\n  && y\n"
        "FROM --platform=$BUILDPLATFORM c:2\nUSER 1\n"
    )
    assert [(stage.base, stage.name) for stage in stages] == [("a:1", "b"), ("c:2", None)]
    assert stages[0].instructions == [("RUN", "x && y")]
    assert stages[1].args("USER") == ["1"]


def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """.dockerignore as (is an exception, regex) in file order, with Docker's glob rules."""
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        glob = str(PurePosixPath(line.removeprefix("!").strip().strip("/")))
        regex, i = "", 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif glob[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex, i = regex + glob[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(glob[i]), i + 1
        patterns.append((negate, re.compile(regex)))
    return patterns


def docker_context() -> list[str]:
    """The files `docker build .` sends (a path is excluded if it or a parent matches; last match wins)."""
    patterns = _ignore_patterns()

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        result = False
        for negate, regex in patterns:
            if any(regex.fullmatch(prefix) for prefix in prefixes):
                result = not negate
        return result

    files = []
    for folder, dirs, names in os.walk(ROOT):
        base = Path(folder).relative_to(ROOT).as_posix()
        relative_dirs = {name: name if base == "." else f"{base}/{name}" for name in dirs}
        dirs[:] = [
            name
            for name, relative in relative_dirs.items()
            if not excluded(relative)
            or any(regex.pattern.startswith(re.escape(relative)) for negate, regex in patterns if negate)
        ]
        for name in names:
            relative = name if base == "." else f"{base}/{name}"
            if not excluded(relative):
                files.append(relative)
    return sorted(files)


def test_docker_context_holds_the_package_and_nothing_private() -> None:
    context = docker_context()
    assert "pyproject.toml" in context
    assert {"LICENSE", "requirements.lock"} <= set(context)
    assert "senderd/__init__.py" in context
    assert "senderd/cli.py" in context
    for file in context:
        assert not file.startswith((".venv/", ".git/", "tests/", "deploy/")), file
        assert "__pycache__" not in file and not file.endswith(".pyc"), file
        assert not re.search(r"service-key.*\.json$|\.(pem|key|crt|p12)$", file), f"secret material: {file}"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_wheel_builds_from_the_docker_context(tmp_path: Path) -> None:
    """What the builder stage runs (`pip wheel --no-deps -w /dist .`) on what `COPY . .` copies."""
    source = tmp_path / "src"
    for relative in docker_context():
        target = source / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, target)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "-w", dist, ".", cwd=source, timeout=220)
    wheels = list(dist.glob("*.whl"))
    assert [wheel.name for wheel in wheels] == [f"senderd-{VERSION}-py3-none-any.whl"]
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        assert "senderd/cli.py" in names
        assert not [name for name in names if name.startswith("tests/")]
        entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
        assert "senderd = senderd.cli:main" in wheel.read(entry_points).decode()


def test_lock_pins_exactly_the_runtime_dependencies() -> None:
    """requirements.lock (scripts/lock) pins every runtime dependency pyproject names, and the `postgresql`
    extra the image carries (psycopg with its binary and pool parts), each to one version."""
    lines = [line for line in (ROOT / "requirements.lock").read_text().splitlines() if not line.startswith("#")]
    pins = dict(line.split("==") for line in lines)
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version) for version in pins.values()), pins
    normal = {re.sub(r"[-_.]+", "-", name).lower() for name in pins}
    with (ROOT / "pyproject.toml").open("rb") as file:
        project = tomllib.load(file)["project"]
    wanted = [
        *project["dependencies"],
        *project["optional-dependencies"]["postgresql"],
        "psycopg-binary",
        "psycopg-pool",
    ]
    for requirement in wanted:
        name = re.split(r"[\[<>=!~ ]", requirement, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in normal, f"{name} is not in requirements.lock (scripts/lock)"


def test_license_is_the_apache_text_pyproject_names() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    with (ROOT / "pyproject.toml").open("rb") as file:
        assert tomllib.load(file)["project"]["license"] == {"text": "Apache-2.0"}
