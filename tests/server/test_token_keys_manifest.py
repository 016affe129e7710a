"""The server's manifest carries the token keys it pinned at start; `measure` agrees."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sealserve.auth import generate_keypair
from sealserve.server.manifest import build_manifest, measure_entries, token_keys_for
from sealserve.server.repository import scan_repository
from sealserve.server.settings import Settings


def test_manifest_records_the_pinned_token_keys(
    start_server: Any, repo: Path, tmp_path: Path
) -> None:
    _, jwks = generate_keypair("ES256")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    auth = {"audience": "sealserve", "required_tos_version": "1",
            "issuers": [{"issuer": "https://iss.example", "jwks_file": str(path)}]}  # fmt: skip
    running = start_server(model_repository=repo, unsafe_plaintext=True, auth=auth)
    record = running.server.manifest.extra["token_keys"]
    assert record == {"https://iss.example": {"source": "file", "admin": True,
                      "thumbprints": [jwks["keys"][0]["kid"]]}}  # fmt: skip
    settings = Settings.load(None, model_repository=repo, unsafe_plaintext=True, auth=auth)
    assert token_keys_for(settings) == record
    # Reproduced from outside (as `sealserve measure` does), the digest matches.
    expected = build_manifest(settings, measure_entries(scan_repository(repo)),
                              hardening=running.server.manifest.hardening)  # fmt: skip
    assert expected.extra["token_keys"] == record
