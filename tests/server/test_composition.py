"""The composition root builds in one order: the constructor does no I/O, ``start``
builds each object once and complete (no object is wired again afterwards)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sealserve.defense.guard import Guard
from sealserve.errors import ConfigError
from sealserve.server.app import Server
from sealserve.server.settings import Settings
from tests.server import models


def test_constructor_touches_nothing_and_start_reports_the_store(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the store's directory should be")
    settings = Settings.load(
        None, port=0, unsafe_plaintext=True, unsafe_disable_auth=True,
        model_repository=tmp_path / "no-such-repository",
        state_store=f"sqlite://{blocked / 'state.db'}", limits={"tiers": {"t": {"per_day": 1}}},
    )  # fmt: skip
    server = Server(settings)  # neither the repository nor the store is looked at
    assert not hasattr(server, "plane") and server.store is None

    with pytest.raises(ConfigError, match="model_repository"):
        asyncio.run(server.start())  # the repository comes before the store
    (tmp_path / "repo").mkdir()
    models.matmul(tmp_path / "repo")
    settings = settings.model_copy(update={"model_repository": tmp_path / "repo"})
    with pytest.raises(ConfigError, match="state_store"):
        asyncio.run(Server(settings).start())


def test_key_provider_is_built_complete_with_what_the_evidence_publishes(
    start_server: Any, repo: Path, sim_root: Path
) -> None:
    running = start_server(
        model_repository=repo, attestation_platform="simulated", simulated_platform_dir=sim_root
    )
    server = running.server
    release = server.keys.release
    assert release is not None and release.platform is server.platform
    assert release.manifest == server.manifest.to_bytes()
    assert release.tls_spki == server.tls.spki_der


def test_without_attestation_keys_come_from_key_files_only(start_server: Any, repo: Path) -> None:
    running = start_server(model_repository=repo, unsafe_plaintext=True)
    assert running.server.keys.release is None


def test_the_guard_is_armed_once() -> None:
    from sealserve.defense.release.pipeline import OutputDefenses

    guard = Guard()
    output = OutputDefenses({})
    guard.arm(output)
    assert guard.output is output
    with pytest.raises(RuntimeError, match="already in place"):
        guard.arm(OutputDefenses({}))
    assert guard.output is output
