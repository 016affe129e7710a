"""Settings and repository configuration: clear errors, safe defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from sealserve.errors import ConfigError
from sealserve.server.repository import scan_repository
from sealserve.server.settings import Settings
from tests.server import models


def test_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="authentication is required"):
        Settings.load(None)
    s = Settings.load(None, unsafe_disable_auth=True)
    assert s.host == "127.0.0.1"
    assert s.unsafe_plaintext is False
    with pytest.raises(Exception, match="frozen"):
        s.port = 1  # type: ignore[misc]


def test_toml_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        'port = 9100\nmodel_repository = "repo"\nunsafe_disable_auth = true\n'
        "[engine]\nintra_op_threads = 2\n"
    )
    s = Settings.load(cfg)
    assert s.port == 9100 and s.engine.intra_op_threads == 2
    assert s.model_repository == tmp_path / "repo"  # relative to the config file
    monkeypatch.setenv("SEALSERVE_PORT", "9200")
    monkeypatch.setenv("SEALSERVE_ENGINE__INTRA_OP_THREADS", "3")
    s = Settings.load(cfg)
    assert s.port == 9200 and s.engine.intra_op_threads == 3


def test_rest_port_is_off_unless_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings.load(None, unsafe_disable_auth=True).rest is None
    cfg = tmp_path / "s.toml"
    cfg.write_text("unsafe_disable_auth = true\n[rest]\nport = 8080\n")
    s = Settings.load(cfg)
    assert s.rest is not None and s.rest.port == 8080 and s.rest.host == "127.0.0.1"
    assert s.measured()["rest"] is True
    monkeypatch.setenv("SEALSERVE_REST__PORT", "8081")
    rest = Settings.load(cfg).rest
    assert rest is not None and rest.port == 8081


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = -5\n", "port: Input should be greater than or equal to 0"),
        ("bogus = 1\n", "bogus: Extra inputs are not permitted"),
        ('tls_cert_file = "c.pem"\n', "tls_cert_file and tls_key_file must be set together"),
        ("port = [\n", "not valid TOML"),
        ("[engine]\nintra_op_threads = 0\n", "engine.intra_op_threads"),
        ("[rest]\nport = 70000\n", "rest.port: Input should be less than or equal to 65535"),
        ("[rest]\nbogus = 1\n", "rest.bogus: Extra inputs are not permitted"),
        ("[rest]\nheader_timeout_s = 0\n", "rest.header_timeout_s"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text + ("" if "[" in text else "unsafe_disable_auth = true\n"))
    with pytest.raises(ConfigError) as info:
        Settings.load(cfg)
    assert message in info.value.message
    assert str(cfg) in info.value.message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(tmp_path / "nope.toml")


def test_version_policies(tmp_path: Path) -> None:
    repo = tmp_path / "m"
    models.matmul(repo, versions=(1, 2, 3))
    assert [e.version for e in scan_repository(repo)] == ["3"]
    (repo / "matmul" / "config.toml").write_text('version_policy = "all"\n')
    assert [e.version for e in scan_repository(repo)] == ["1", "2", "3"]
    (repo / "matmul" / "config.toml").write_text('version_policy = "specific"\nversions = [1, 3]\n')
    assert [e.version for e in scan_repository(repo)] == ["1", "3"]
    (repo / "matmul" / "config.toml").write_text('version_policy = "specific"\nversions = [4]\n')
    with pytest.raises(ConfigError, match=r"configured versions \[4\] are not on disk"):
        scan_repository(repo)
    (repo / "matmul" / "config.toml").write_text("[batching]\nmax_batch_size = -1\n")
    with pytest.raises(ConfigError, match="batching.max_batch_size"):
        scan_repository(repo)


def test_empty_repository(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="holds no model"):
        scan_repository(tmp_path)
    with pytest.raises(ConfigError, match="is not a directory"):
        scan_repository(tmp_path / "absent")


def test_not_an_onnx_model(tmp_path: Path) -> None:
    from sealserve.server.engine import Engine
    from sealserve.server.metrics import Metrics

    bad = tmp_path / "m" / "junk" / "1" / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"definitely not onnx")
    engine = Engine(Metrics())
    with pytest.raises(ConfigError, match="model junk version 1 .* is not a loadable ONNX model"):
        engine.load(scan_repository(tmp_path / "m"))


def test_workers_default_to_the_usable_cores_with_a_shared_store(tmp_path: Path) -> None:
    from sealserve.server.settings import usable_cpus

    base = {"model_repository": str(tmp_path), "unsafe_disable_auth": True}
    memory = Settings.load(None, **base, state_store="memory:")
    assert memory.workers == "auto" and memory.worker_count() == 1  # memory: is per process
    shared = Settings.load(None, **base, state_store=f"sqlite://{tmp_path}/s.db")
    assert shared.worker_count() == usable_cpus()
    with pytest.raises(ConfigError, match="workers > 1 needs a state store"):
        Settings.load(None, **base, state_store="memory:", workers=2)


def test_usable_cores_follow_the_cgroup_cpu_limit(tmp_path: Path) -> None:
    import os

    from sealserve.server.settings import usable_cpus

    cores = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    assert usable_cpus(v2) == cores  # no cgroup files: the affinity
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(v2) == cores  # no limit
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(v2) == 1  # half a core: one process
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(v2) == min(cores, 2)  # 1.5 cores, rounded up
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(v1) == cores
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert usable_cpus(v1) == 1
