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


def _load(directory: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


# What `kubectl apply -f deploy/k8s/` applies (not recursive), and the Secrets' shape,
# kept apart in deploy/k8s/secrets/ so that applying the directory never overwrites them.
APPLIED = _load(K8S)
SECRETS = _load(K8S / "secrets")
DOCS = APPLIED + SECRETS


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
        ("Secret", "sealserve-redis"), ("Secret", "sealserve-broker-tls"),
        ("ConfigMap", "sealserve-server"), ("ConfigMap", "sealserve-broker"),
        ("Deployment", "sealserve-server"), ("Deployment", "sealserve-broker"),
        ("Deployment", "sealserve-redis"),
        ("Service", "sealserve"), ("Service", "sealserve-broker"), ("Service", "sealserve-redis"),
        ("PersistentVolumeClaim", "sealserve-models"),
        ("PersistentVolumeClaim", "sealserve-redis-data"),
        ("PersistentVolumeClaim", "sealserve-broker-data"),
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
    # The image's writable paths are the pod's writable volumes, and the state store
    # lives on one (the default would be beside the config, on the read-only root).
    assert {"/var/lib/sealserve", "/tmp"} <= set(mounts)
    assert settings.state_store == "sqlite:///var/lib/sealserve/state.db"
    assert not mounts["/var/lib/sealserve"].get("readOnly", False)
    # The broker's certificate is pinned from the mounted Secret (its key is not there).
    kb = settings.key_broker
    assert kb is not None and kb.ca_file is not None
    assert str(kb.ca_file.parent) in mounts
    host, port = kb.target.rsplit(":", 1)
    broker = _one("Service", "sealserve-broker")
    assert host == broker["metadata"]["name"] == kb.server_name
    assert int(port) == broker["spec"]["ports"][0]["port"]
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
    assert SECRETS and all(doc["kind"] == "Secret" for doc in SECRETS)
    for doc in SECRETS:
        assert "data" not in doc  # nothing base64-encoded to hide a real value in
        for key, value in doc["stringData"].items():
            assert "PRIVATE KEY" not in value
            assert value.startswith("REPLACE-ME") or value == '{"keys": []}', key


def test_applying_the_directory_never_overwrites_a_secret() -> None:
    assert [d["metadata"]["name"] for d in APPLIED if d["kind"] == "Secret"] == []


def test_the_guide_creates_every_secret_before_applying_the_directory() -> None:
    from tests.deploy.conftest import guide_blocks

    (block,) = [text for tag, text in guide_blocks() if tag == "on-cluster" and "kubectl" in text]
    lines = [line.strip() for line in block.splitlines()]
    apply_all = lines.index("kubectl apply -f deploy/k8s/")
    for doc in SECRETS:
        name = doc["metadata"]["name"]
        created = [
            i for i, line in enumerate(lines) if "create secret" in line and f" {name} " in line
        ]
        assert created and created[0] < apply_all, f"the guide does not create {name} first"
    assert not any("deploy/k8s/secrets" in line for line in lines if "apply" in line)


def _secret_volumes(name: str) -> dict[str, dict[str, Any]]:
    spec = _pods()[name]["spec"]
    return {v["secret"]["secretName"]: v["secret"] for v in spec["volumes"] if "secret" in v}


def test_broker_gets_the_master_key_and_the_server_does_not() -> None:
    assert set(_secret_volumes("sealserve-broker")) == {
        "sealserve-broker-master-key",
        "sealserve-broker-tls",
        "sealserve-jwks",
    }
    server = _secret_volumes("sealserve-server")
    assert set(server) == {"sealserve-jwks", "sealserve-broker-tls"}
    # The server pins the broker's certificate; the broker's TLS key is not mounted.
    assert server["sealserve-broker-tls"]["items"] == [{"key": "tls.crt", "path": "tls.crt"}]


def test_broker_config_is_a_working_config_and_matches_the_pod(tmp_path: Path) -> None:
    from sealserve.broker.settings import BrokerSettings

    toml = tmp_path / "broker.toml"
    toml.write_text(_one("ConfigMap", "sealserve-broker")["data"]["broker.toml"])
    settings = BrokerSettings.load(toml)  # the broker's own loader: raises ConfigError
    pod = _pods()["sealserve-broker"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["sealserve", "broker", "serve"]
    (config_path,) = container["args"][1:]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[config_path]["subPath"] == "broker.toml"
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mount_of(path: Path) -> dict[str, Any]:
        (mount,) = [m for p, m in mounts.items() if str(path).startswith(p + "/")]
        return mount

    assert settings.host == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": settings.port}
    # TLS from the Secret (the identity survives restarts), not an in-memory key.
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    assert volumes[mount_of(settings.tls_cert_file)["name"]]["secret"]["secretName"] == (
        "sealserve-broker-tls"
    )
    assert settings.master_key_file is not None
    key_volume = volumes[mount_of(settings.master_key_file)["name"]]
    assert key_volume["secret"]["secretName"] == "sealserve-broker-master-key"
    assert settings.admin.jwks_file is not None
    assert volumes[mount_of(settings.admin.jwks_file)["name"]]["secret"]["secretName"] == (
        "sealserve-jwks"
    )
    # The sealed key store is on a writable, persistent volume.
    store = mount_of(settings.store_file)
    assert not store.get("readOnly", False)
    claim = volumes[store["name"]]["persistentVolumeClaim"]["claimName"]
    assert _one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert settings.unsafe_simulated_root_dir is None
    text = (K8S / "40-broker.yaml").read_text().lower()
    assert "does not exist" not in text and "coming with" not in text
