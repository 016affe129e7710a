"""deploy/k8s: every manifest validates against the Kubernetes schemas (offline), and
the security and wiring choices documented in docs/deploy.md hold."""

from __future__ import annotations

import copy
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from sealserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# Oldest and newest Kubernetes minor versions the manifests are checked against.
VERSIONS = ("1.31.0", "1.36.0")


def _load() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


DOCS = _load()


def _one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def _pods() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"]["template"] for d in DOCS if d["kind"] == "Deployment"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The schemas ship with kubernetes-validate: validating must not touch the network."""

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"validation tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield


def test_the_expected_resources_exist() -> None:
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in DOCS)
    assert kinds == sorted([
        ("Namespace", "sealserve"),
        ("Secret", "sealserve-jwks"), ("Secret", "sealserve-broker-master-key"),
        ("Secret", "sealserve-redis"),
        ("ConfigMap", "sealserve-server"), ("ConfigMap", "sealserve-broker"),
        ("Deployment", "sealserve-server"), ("Deployment", "sealserve-broker"),
        ("Deployment", "sealserve-redis"),
        ("Service", "sealserve"), ("Service", "sealserve-broker"), ("Service", "sealserve-redis"),
        ("PersistentVolumeClaim", "sealserve-models"),
        ("PersistentVolumeClaim", "sealserve-redis-data"),
        ("NetworkPolicy", "default-deny-ingress"), ("NetworkPolicy", "server-ingress"),
        ("NetworkPolicy", "broker-from-server-only"), ("NetworkPolicy", "redis-from-server-only"),
    ])  # fmt: skip
    assert all(d["metadata"].get("namespace", "sealserve") == "sealserve" for d in DOCS)


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates(version: str) -> None:
    for doc in DOCS:
        got = kubernetes_validate.validate(doc, version, strict=True)
        assert got == version.rsplit(".", 1)[0]


def test_the_validator_catches_mistakes() -> None:
    broken = copy.deepcopy(_one("Deployment", "sealserve-server"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError, match="'two' is not of type"):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)
    typo = copy.deepcopy(_one("Deployment", "sealserve-server"))
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFs"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFs"):
        kubernetes_validate.validate(typo, VERSIONS[0], strict=True)


def test_native_grpc_probe_needs_tls_mode_from_1_37() -> None:
    """The serving port speaks TLS only; the kubelet's gRPC probe gained TLS in 1.37."""
    server = copy.deepcopy(_one("Deployment", "sealserve-server"))
    container = server["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        container[probe]["grpc"] = {"port": 8001, "mode": "TLS"}
    assert kubernetes_validate.validate(server, "1.37.0", strict=True) == "1.37"
    with pytest.raises(kubernetes_validate.ValidationError, match="mode"):
        kubernetes_validate.validate(server, "1.36.0", strict=True)


def test_restricted_security_context_everywhere_but_attestation() -> None:
    for name, pod in _pods().items():
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc.get("privileged", False) is False, name
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
            if name == "sealserve-server":
                # The documented exception: root (no capabilities) for configfs-tsm.
                assert sc["runAsUser"] == 0 and sc["runAsNonRoot"] is False
            else:
                assert sc["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
        host_paths = [v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v]
        expected = ["/sys/kernel/config"] if name == "sealserve-server" else []
        assert host_paths == expected, name


def test_server_runs_only_on_confidential_nodes() -> None:
    spec = _pods()["sealserve-server"]["spec"]
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    allowed = {
        (e["key"], tuple(e["values"]))
        for t in terms["nodeSelectorTerms"]
        for e in t["matchExpressions"]
        if e["operator"] == "In"
    }
    assert allowed == {
        ("kubernetes.azure.com/security-type", ("ConfidentialVM",)),
        ("cloud.google.com/gke-confidential-nodes-instance-type", ("SEV_SNP", "TDX")),
        ("sealserve.dev/tee", ("sev-snp", "tdx")),
    }
    assert {"key": "sealserve.dev/confidential", "operator": "Equal", "value": "true",
            "effect": "NoSchedule"} in spec["tolerations"]  # fmt: skip


def test_server_config_is_valid_and_matches_the_pod(tmp_path: Path) -> None:
    toml = tmp_path / "sealserve.toml"
    toml.write_text(_one("ConfigMap", "sealserve-server")["data"]["sealserve.toml"])
    settings = Settings.load(toml)
    assert settings.host == "0.0.0.0" and settings.attestation_platform == "configfs-tsm"
    pod = _pods()["sealserve-server"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": settings.port,
        "metrics": settings.metrics_port,
        "health": settings.health_port,
    }
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert str(settings.model_repository) in mounts
    auth = settings.auth
    assert auth is not None and auth.issuers[0].jwks_file is not None
    assert str(auth.issuers[0].jwks_file.parent) in mounts
    # The image's writable paths are the pod's writable volumes.
    assert {"/var/lib/sealserve", "/tmp"} <= set(mounts)
    assert container["args"] == ["--config", "/etc/sealserve/sealserve.toml"]
    # Native gRPC probes, on the plaintext health-only port.
    assert settings.health_host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": settings.health_port}, probe


def test_services_and_policies_select_the_right_pods() -> None:
    pods = {n: p["metadata"]["labels"] for n, p in _pods().items()}

    def selects(selector: dict[str, str]) -> set[str]:
        return {n for n, labels in pods.items() if selector.items() <= labels.items()}

    assert selects(_one("Service", "sealserve")["spec"]["selector"]) == {"sealserve-server"}
    assert selects(_one("Service", "sealserve-broker")["spec"]["selector"]) == {"sealserve-broker"}
    assert selects(_one("Service", "sealserve-redis")["spec"]["selector"]) == {"sealserve-redis"}
    assert _one("NetworkPolicy", "default-deny-ingress")["spec"]["podSelector"] == {}
    for policy, target in (("broker-from-server-only", "sealserve-broker"),
                           ("redis-from-server-only", "sealserve-redis")):  # fmt: skip
        spec = _one("NetworkPolicy", policy)["spec"]
        assert selects(spec["podSelector"]["matchLabels"]) == {target}
        (rule,) = spec["ingress"]
        (peer,) = rule["from"]
        assert set(peer) == {"podSelector"}  # no namespaceSelector, no ipBlock
        assert selects(peer["podSelector"]["matchLabels"]) == {"sealserve-server"}
        service = _one("Service", target)["spec"]["ports"][0]
        assert [p["port"] for p in rule["ports"]] == [service["port"]]


def test_secrets_hold_placeholders_only() -> None:
    for doc in DOCS:
        if doc["kind"] != "Secret":
            continue
        assert "data" not in doc  # nothing base64-encoded to hide a real value in
        for key, value in doc["stringData"].items():
            assert "PRIVATE KEY" not in value
            assert value.startswith("REPLACE-ME") or value == '{"keys": []}', key


def test_broker_gets_the_master_key_and_the_server_does_not() -> None:
    def secrets(name: str) -> set[str]:
        spec = _pods()[name]["spec"]
        return {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}

    assert secrets("sealserve-broker") == {"sealserve-broker-master-key"}
    assert secrets("sealserve-server") == {"sealserve-jwks"}
