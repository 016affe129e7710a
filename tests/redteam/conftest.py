"""Servers for the red-team tests: the in-thread one (auth off) and `sealserve serve`
processes with [auth] and [limits] for rotation and refusal handling."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sealserve.auth import TokenIssuer, generate_keypair
from tests._servers import start_server  # noqa: F401  (fixture)
from tests.conftest import sealserve_cmd, sealserve_env

ISS, AUD, TOS = "https://issuer.test.invalid", "sealserve-test", "2026-11"


class Deployment:
    """A config with [auth] (local JWKS) and ``limits``, served by `sealserve serve`."""

    def __init__(self, tmp: Path, limits: str) -> None:
        from sealserve import demo

        self.tmp = tmp
        pem, jwks = generate_keypair("ES256")
        (tmp / "jwks.json").write_text(json.dumps(jwks))
        self.issuer = TokenIssuer.from_pem(pem, issuer=ISS, audience=AUD)
        shutil.copytree(demo.repository(), tmp / "models")
        self.config = tmp / "sealserve.toml"
        self.config.write_text(
            'model_repository = "models"\nport = 0\nunsafe_plaintext = true\n'
            'log_format = "text"\nattestation_platform = "none"\n'
            'state_store = "sqlite://state.db"\n'
            f'[auth]\naudience = "{AUD}"\nrequired_tos_version = "{TOS}"\n'
            f'[[auth.issuers]]\nissuer = "{ISS}"\njwks_file = "jwks.json"\n' + limits
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def token(self, account: str, tier: str = "t", scopes: tuple[str, ...] = ("infer",)) -> str:
        return self.issuer.issue(account, tier=tier, scopes=list(scopes), tos_version=TOS, ttl=900)

    def set_status(self, target: str, account: str, status: str, **kw: Any) -> None:
        """Set an account's status through the Admin service (as the operator)."""
        import grpc

        from sealserve._proto import admin_pb2, admin_pb2_grpc

        with grpc.insecure_channel(target) as channel:
            admin_pb2_grpc.AdminStub(channel).SetStatus(
                admin_pb2.SetStatusRequest(account=account, status=status, tier="t", **kw),
                metadata=(("authorization", f"Bearer {self.token('op', scopes=('admin',))}"),),
                timeout=10,
            )

    def start(self) -> str:
        ready = self.tmp / "ready.json"
        self.proc = subprocess.Popen(
            sealserve_cmd("serve", "--config", str(self.config), "--ready-file", str(ready)),
            env=sealserve_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                out = self.proc.stdout.read().decode() if self.proc.stdout else ""
                pytest.fail(f"server did not start: {out}")
            time.sleep(0.05)
        return f"127.0.0.1:{json.loads(ready.read_text())['port']}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Any]:
    made: list[Deployment] = []

    def _make(limits: str) -> Deployment:
        d = Deployment(tmp_path, limits)
        made.append(d)
        return d

    yield _make
    for d in made:
        d.stop()


def export_logistic_regression(repo: Path, name: str = "logreg") -> Path:
    """A multinomial logistic regression on digits, exported with skl2onnx with the
    demo model's interface (input 'input'; outputs 'label', 'probabilities')."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from sealserve.redteam.data import digits_split

    x, y, _, _ = digits_split()
    clf = LogisticRegression(max_iter=300, C=1.0).fit(x / 16.0, y)
    clf.coef_ = clf.coef_ / 16.0  # the same model on raw 0..16 inputs (faster to fit scaled)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    old = onx.graph.input[0].name
    onx.graph.input[0].name = "input"
    for node in onx.graph.node:
        node.input[:] = ["input" if n == old else n for n in node.input]
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())
    return path


@pytest.fixture(scope="session")
def logreg_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("logreg-models")
    export_logistic_regression(repo)
    return repo


X0 = {"input": np.zeros((1, 64), np.float32)}
