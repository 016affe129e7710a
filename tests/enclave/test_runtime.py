"""The runtime record (interpreter, distributions, loaded modules, Python hooks) and
the start-up decision on a real platform."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from sealserve.attestation.claims import Platform as Kind
from sealserve.enclave.runtime import check_hooks, record_runtime
from sealserve.errors import ConfigError
from sealserve.server.manifest import is_real_platform, runtime_json
from sealserve.server.settings import Settings

CLEAN: dict[str, str] = {}


def _module(name: str, path: Path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = str(path)
    return module


def test_the_record_is_stable_and_names_the_interpreter() -> None:
    a = record_runtime(environ=CLEAN).to_json()
    b = record_runtime(environ=CLEAN).to_json()
    assert a == b
    assert len(a["interpreter_sha256"]) == 64 and a["distributions"] > 10
    assert not any(h["kind"] == "env" for h in a["hooks"])


@pytest.mark.parametrize(
    "knob", ["PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "LD_PRELOAD", "LD_LIBRARY_PATH"]
)
def test_each_environment_knob_is_a_visible_hook(knob: str) -> None:
    clean = record_runtime(environ=CLEAN)
    hooked = record_runtime(environ={knob: "/srv/evil"})
    assert ("env", knob, "/srv/evil") in {(h.kind, h.name, h.detail) for h in hooked.hooks}
    assert hooked.to_json() != clean.to_json()


def test_a_loaded_sitecustomize_and_a_foreign_module_are_listed(tmp_path: Path) -> None:
    import sys

    custom = tmp_path / "sitecustomize.py"
    custom.write_text("# hooks decryption\n")
    other = tmp_path / "evil_helper.py"
    other.write_text("x = 1\n")
    modules = {**sys.modules, "sitecustomize": _module("sitecustomize", custom),
               "evil_helper": _module("evil_helper", other)}  # fmt: skip
    record = record_runtime(environ=CLEAN, modules=modules)
    names = {(h.kind, h.name) for h in record.hooks}
    assert ("customize", "sitecustomize") in names
    assert set(record.foreign_modules) >= {"sitecustomize", "evil_helper"}
    other.write_text("x = 2\n")  # another file content -> another digest (fresh path)
    moved = tmp_path / "evil_helper2.py"
    moved.write_text("x = 2\n")
    again = record_runtime(environ=CLEAN, modules={**modules,
                                                   "evil_helper": _module("evil_helper", moved)})  # fmt: skip
    assert again.foreign_modules["evil_helper"] != record.foreign_modules["evil_helper"]


def test_a_loaded_distribution_file_that_differs_from_its_record_is_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sealserve.enclave.runtime as rt

    fake = tmp_path / "site" / "somelib" / "__init__.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("patched = True\n")
    files = dict(rt._distribution_files())
    files[str(fake)] = "00" * 32  # RECORD says another content
    monkeypatch.setattr(rt, "_distribution_files", lambda: files)
    rt._classify.cache_clear()
    record = record_runtime(environ=CLEAN, modules={"somelib": _module("somelib", fake)})
    rt._classify.cache_clear()
    assert str(fake) in record.modified_files


class _Configfs:
    kind = Kind.SEV_SNP


class _Simulated:
    kind = Kind.SIMULATED_SNP


def test_on_a_real_platform_a_hook_stops_the_start_unless_unsafe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert is_real_platform(_Configfs()) and not is_real_platform(_Simulated())  # type: ignore[arg-type]
    assert not is_real_platform(None)
    hooked = record_runtime(environ={"PYTHONPATH": "/srv/evil"})
    with pytest.raises(
        ConfigError, match="python hooks present on a real platform: env PYTHONPATH"
    ):
        check_hooks(hooked, real_platform=True, unsafe_allow_python_hooks=False)
    check_hooks(hooked, real_platform=False, unsafe_allow_python_hooks=False)  # simulated: recorded
    check_hooks(hooked, real_platform=True, unsafe_allow_python_hooks=True)
    # The server's path: the same decision, and the manifest says when it was overridden.
    monkeypatch.setenv("PYTHONPATH", "/srv/evil")
    settings = Settings.load(None, unsafe_disable_auth=True)
    with pytest.raises(ConfigError, match="env PYTHONPATH"):
        runtime_json(settings, real_platform=True)
    unsafe = Settings.load(None, unsafe_disable_auth=True, unsafe_allow_python_hooks=True)
    doc = runtime_json(unsafe, real_platform=True)
    assert doc["unsafe_allow_python_hooks"] is True
    assert "unsafe_allow_python_hooks" not in runtime_json(settings, real_platform=False)
