"""Every shipped config passes check-config; every manifest, unit, rule file and the
Dockerfile is checked with the tool that understands it (kubernetes-validate,
promtool, systemd-analyze) plus the fields that matter to us."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
K8S = sorted((EXAMPLES / "kubernetes").glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _embedded_configs() -> list[tuple[str, str]]:
    """(where, YAML text) of every agent config inside a ConfigMap."""
    out = []
    for path in K8S:
        for doc in _docs(path):
            if doc["kind"] == "ConfigMap" and "agent.yaml" in doc.get("data", {}):
                out.append((f"{path.name}:{doc['metadata']['name']}", doc["data"]["agent.yaml"]))
    return out


CONFIG_FILES = sorted(
    [*(ROOT / "config").rglob("*.yaml"), *EXAMPLES.rglob("agent.yaml")],
)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_passes_check_config(
    path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGADMIN_PASSWORD", "unused")  # referenced by env: in one example
    code = main(["-c", str(path), "check-config"])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize("where,text", _embedded_configs(), ids=lambda x: str(x)[:40])
def test_every_config_in_a_configmap_passes_check_config(
    where: str, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    assert main(["-c", str(path), "check-config"]) == 0, f"{where}: {capsys.readouterr().err}"


def test_the_manifests_hold_configs() -> None:
    assert len(_embedded_configs()) >= 3


# --------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path: Path) -> None:
    version = kubernetes_validate.latest_version()
    for doc in _docs(path):
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            _check_service_monitor(doc)  # a CRD: no schema in the package
            continue
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_misplaced_field() -> None:
    doc = _docs(EXAMPLES / "kubernetes" / "deployment.yaml")[-1]
    doc["spec"]["template"]["spec"]["initContainers"][0]["restartpolicy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def _check_service_monitor(doc: dict[str, Any]) -> None:
    assert doc["kind"] == "ServiceMonitor"
    assert doc["spec"]["selector"]["matchLabels"]
    assert [e["port"] for e in doc["spec"]["endpoints"]] == ["metrics"]


def _pods() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for path in K8S:
        for doc in _docs(path):
            if doc["kind"] in ("Deployment", "Job"):
                out.append((path.name, doc["kind"], doc["spec"]["template"]))
    return out


@pytest.mark.parametrize("name,kind,template", _pods(), ids=lambda x: str(x)[:30])
def test_every_pod_is_locked_down(name: str, kind: str, template: dict[str, Any]) -> None:
    spec = template["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    agent = spec["initContainers"][0]
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    # rendered files on a memory-backed emptyDir, config read-only
    assert volumes[mounts["/run/secrets"]["name"]]["emptyDir"]["medium"] == "Memory"
    assert mounts["/etc/secrets-agent"]["readOnly"] is True
    if kind == "Deployment":
        # a native sidecar, started before the app, gated on readiness
        assert agent["restartPolicy"] == "Always"
        assert agent["startupProbe"]["exec"]["command"] == [
            "secrets-agent",
            "health",
            "--ready",
        ]
        assert mounts["/run/secrets-agent"]["name"] in {
            m["name"] for m in spec["containers"][0]["volumeMounts"]
        }
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert any(
            p["containerPort"] == int(annotations["prometheus.io/port"]) for p in agent["ports"]
        )
    else:
        assert "restartPolicy" not in agent  # runs to completion before the job
        assert agent["args"] == ["render", "--once"]


@pytest.mark.parametrize("name,kind,template", _pods(), ids=lambda x: str(x)[:30])
def test_the_app_reads_what_the_agent_renders_and_serves(
    name: str, kind: str, template: dict[str, Any]
) -> None:
    """Destinations and the socket named in the ConfigMap live on volumes both containers mount."""
    spec = template["spec"]
    cm_name = next(v for v in spec["volumes"] if v["name"] == "config")["configMap"]["name"]
    text = dict(_embedded_configs())[f"{name}:{cm_name}"]
    cfg = yaml.safe_load(text)
    app_mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    paths = [t["destination"] for t in cfg["templates"]]
    if kind == "Deployment":
        paths.append(cfg["listen"]["socket"])
    for p in paths:
        assert any(p.startswith(m + "/") for m in app_mounts), p


# --------------------------------------------------------------------------- Prometheus


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian: apt install prometheus)")
    return tool


@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
        ["check", "config", "prometheus.yml"],
    ],
    ids=" ".join,
)
def test_promtool(args: list[str]) -> None:
    proc = subprocess.run(
        [_promtool(), *args],
        cwd=EXAMPLES / "prometheus",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_alerts_cover_what_the_issue_asks() -> None:
    rules = yaml.safe_load((EXAMPLES / "prometheus" / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {
        "SecretsAgentSecretStale",
        "SecretsAgentRefreshFailing",
        "SecretsAgentRotationFailing",
        "SecretsAgentKeyRevoked",
        "SecretsAgentRenderFailing",
        "SecretsAgentNotReady",
    } <= names


def test_the_dashboard_queries_metrics_the_agent_exports() -> None:
    import json

    from prometheus_client import generate_latest

    from agent.metrics import Metrics

    exported = set(re.findall(r"^# TYPE (\S+)", generate_latest(Metrics().registry).decode(), re.M))
    exported |= {f"{n}_total" for n in exported} | {f"{n}_bucket" for n in exported}
    dashboard = json.loads((EXAMPLES / "grafana" / "secrets-agent.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    for expr in exprs:
        for name in re.findall(r"\b((?:secrets_agent|process)_[a-z_]+)", expr):
            assert name in exported, f"{name} in {expr!r}"


# --------------------------------------------------------------------------- systemd


def test_systemd_unit_verifies_and_matches_its_config(tmp_path: Path) -> None:
    unit = (EXAMPLES / "systemd" / "secrets-agent.service").read_text()
    for directive in (
        "ProtectSystem=strict",
        "RuntimeDirectory=secrets-agent",
        "StateDirectory=secrets-agent secrets-agent/store",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
    ):
        assert directive in unit, directive
    cfg = yaml.safe_load((EXAMPLES / "systemd" / "agent.yaml").read_text())
    writable = ("/run/secrets-agent/", "/var/lib/secrets-agent/", "/var/log/secrets-agent/")
    for path in (
        cfg["listen"]["socket"],
        cfg["keys"]["local"]["keyring"],
        cfg["store"]["path"],
        cfg["audit"]["path"],
        *(t["destination"] for t in cfg["templates"]),
    ):
        assert path.startswith(writable), f"{path} is read-only under ProtectSystem=strict"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    local = tmp_path / "secrets-agent.service"
    exe = Path(sys.executable).parent / "secrets-agent"
    local.write_text(unit.replace("/usr/local/bin/secrets-agent", str(exe)))
    proc = subprocess.run(
        [analyze, "verify", str(local)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- container


def test_every_path_the_dockerfile_copies_exists_and_is_not_ignored() -> None:
    text = (ROOT / "Dockerfile").read_text()
    ignore = (ROOT / ".dockerignore").read_text().split()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src


def test_the_image_is_pinned_labelled_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    image = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert image is not None
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", image.group(1))
    for label in ("title", "version", "source", "licenses", "description"):
        assert f"org.opencontainers.image.{label}=" in text
    assert "USER 10001:10001" in text
    assert (ROOT / "constraints.txt").is_file()


def _runtime_requirements() -> dict[str, str]:
    """Every distribution the image installs (`.[etcd,aws,pkcs11]`), transitively, by name."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    found: dict[str, str] = {}
    todo = [("secrets-agent", frozenset({"etcd", "aws", "pkcs11"}))]
    while todo:
        name, extras = todo.pop()
        for text in metadata.requires(name) or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            key = canonicalize_name(req.name)
            if key not in found:
                found[key] = req.name
                todo.append((req.name, frozenset(req.extras)))
    return found


def test_every_package_the_image_installs_is_pinned() -> None:
    """constraints.txt pins the whole runtime set, so a new dependency cannot float in the image."""
    from packaging.utils import canonicalize_name

    pinned = {
        canonicalize_name(line.split("==")[0])
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    needed = _runtime_requirements()
    assert {"aiohttp", "tqdm", "aetcd", "aiobotocore", "python-pkcs11"} <= set(needed)
    assert sorted(set(needed) - pinned) == []
