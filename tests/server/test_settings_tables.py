"""[auth], [limits] and [defense] are typed and validated once, when the settings are
built; the workload manifest still records them exactly as before (its digest is what
auditors pin, so the same config must give the same bytes)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sealserve.auth.settings import AuthSettings
from sealserve.defense.config import DefenseConfig
from sealserve.defense.limits import CostMode, LimitsConfig
from sealserve.errors import ConfigError
from sealserve.server.settings import Settings

CONFIG = """\
harden_process = false
attestation_platform = "none"
model_repository = "models"
state_store = "sqlite://state/s.db"

[engine]
intra_op_threads = 2

[rest]
port = 0

[auth]
audience = "aud"
required_tos_version = "3"
leeway_seconds = 5
allowed_tiers = ["gold", "free"]
algorithms = ["ES256"]
revocation_file = "revoked.txt"

[[auth.issuers]]
issuer = "https://b.invalid"
jwks_file = "jwks.json"

[[auth.issuers]]
issuer = "https://a.invalid"
jwks_url = "https://a.invalid/jwks"

[limits]
default_tier = "free"
trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]

[limits.tiers.free]
rate = 2.5
burst = 5
per_day = 100

[limits.tiers.gold]
per_minute = 600
cost = "request"
per_model = true
max_rows = 64

[limits.peer]
per_minute = 1000

[limits.models.digits]
per_day = 100000

[defense]
state_dir = "sealed"
throttle_factor = 0.25

[defense.audit]
dir = "auditlog"

[defense.profiles.strict]
round = 2
top_k = 3

[defense.models.digits]
output = "probabilities"
profile = "strict"
tiers = { gold = "none" }
reference = "ref.npz"
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "sealserve.toml"
    path.write_text(CONFIG)
    return path


def test_tables_are_typed_once_with_paths_relative_to_the_file(config: Path) -> None:
    s = Settings.load(config)
    base = config.parent
    assert isinstance(s.auth, AuthSettings)
    assert isinstance(s.limits, LimitsConfig)
    assert isinstance(s.defense, DefenseConfig)
    assert s.limits is s.limits and s.defense is s.defense  # stored, not re-parsed
    assert {i.issuer: i.jwks_file for i in s.auth.issuers} == {
        "https://b.invalid": base / "jwks.json", "https://a.invalid": None,
    }  # fmt: skip
    assert s.auth.revocation_file == base / "revoked.txt"
    assert s.defense.state_dir == base / "sealed"
    assert s.defense.audit.dir == base / "auditlog"
    assert s.defense.models["digits"].reference == base / "ref.npz"
    # A defended server counts rows by default; a tier may still say "request".
    assert s.limits.tiers["free"].cost is CostMode.BATCH
    assert s.limits.tiers["gold"].cost is CostMode.REQUEST


def test_measured_records_the_tables_as_before(config: Path) -> None:
    raw = tomllib.loads(CONFIG)
    measured = Settings.load(config).measured()
    assert measured["limits"] == raw["limits"]  # the table as written
    assert measured["auth"] == {
        "issuers": ["https://a.invalid", "https://b.invalid"],
        "audience": "aud",
        "required_tos_version": "3",
        "tos_claim": "sealserve_tos",
        "tier_claim": "sealserve_tier",
        "scope_claim": "scope",
        "algorithms": ["ES256"],
        "leeway_seconds": 5,
        "default_tier": None,
        "allowed_tiers": ["free", "gold"],
        "max_token_bytes": 8192,
    }
    defense = measured["defense"]
    assert defense["profiles"] == raw["defense"]["profiles"]
    digits = defense["models"]["digits"]
    assert digits["profile"] == "strict" and digits["tiers"] == {"gold": "none"}
    assert digits["distribution_reference"] is True and digits["detection"] is True
    assert defense["throttle_factor"] == 0.25
    assert defense["sealed_state"] is True and defense["audit"] is True
    assert defense["response"] == "default"
    assert not any(str(config.parent) in str(v) for v in _leaves(measured))  # no paths


def test_without_a_config_file_defense_paths_are_taken_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings.load(None, unsafe_disable_auth=True, defense={"state_dir": "sealed"})
    assert s.defense is not None and s.defense.state_dir == tmp_path / "sealed"
    assert s.defense.audit.dir == tmp_path / "audit"


def test_nested_environment_override_reaches_the_auth_table(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEALSERVE_AUTH__AUDIENCE", "from-env")
    s = Settings.load(config)
    assert s.auth is not None and s.auth.audience == "from-env"
    assert s.auth.required_tos_version == "3"  # the rest of the table from the file


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("per_day = 100\n", "per_day = 100\nbogus = 1\n", "limits.tiers.free: unknown key"),
        ('audience = "aud"\n', 'audience = "aud"\naudiense = 1\n', "auth.audiense: unknown key"),
        ('profile = "strict"\n', 'profile = "nope"\n', "[defense.models.digits] names unknown"),
    ],
)
def test_a_bad_table_names_the_file_and_the_key(
    tmp_path: Path, old: str, new: str, message: str
) -> None:
    path = tmp_path / "sealserve.toml"
    path.write_text(CONFIG.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        Settings.load(path)
    assert str(path) in info.value.message
    assert message in info.value.message


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]
