"""What the Python process actually runs, for the workload manifest (defence in depth).

The launch measurement of a measured image is what pins the code (docs/deploy.md);
this record makes a process that runs other code than the image's *say so* in its
attested manifest, so a policy pinning the honest manifest refuses it:

- the interpreter binary (SHA-256 of ``sys.executable``, resolved) and its version;
- every installed distribution (name, version, SHA-256 of its RECORD), and every
  loaded module file checked against its distribution's RECORD hash (a mismatch is
  listed with the file's digest);
- loaded modules that belong to no distribution, to the standard library nor to
  sealserve's own package (whose files the code digest covers): listed with digests;
- the hooks that change what Python runs: the environment knobs in
  :data:`ENV_KNOBS` when set, ``sitecustomize`` / ``usercustomize`` modules, and
  ``.pth`` files in the site directories (a line starting with ``import`` runs code).

Everything here is reproducible from the same installation and environment
(``sealserve measure`` computes the same record), and cheap: only loaded files are
hashed. On a real platform the server refuses to start while a hook is present
(:func:`check_hooks`) unless ``unsafe_allow_python_hooks`` is set, which the record
then carries.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import site
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sealserve.errors import ConfigError

# Environment variables that change which code the interpreter or the loader runs.
ENV_KNOBS = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PYTHONPLATLIBDIR",
    "PYTHONINSPECT",
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
)
CUSTOMIZE_MODULES = ("sitecustomize", "usercustomize")


@dataclass(frozen=True)
class Hook:
    """One thing that makes Python run code the image did not name."""

    kind: str  # "env", "customize", "pth"
    name: str
    detail: str  # the variable's value, or the file's SHA-256

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "name": self.name, "detail": self.detail}


@dataclass(frozen=True)
class RuntimeRecord:
    interpreter: str
    interpreter_sha256: str
    python_version: str
    distributions: Mapping[str, str]  # "name==version" -> RECORD sha256
    modified_files: Mapping[str, str]  # loaded file that differs from RECORD -> sha256
    foreign_modules: Mapping[str, str]  # module name -> sha256 of its file
    pth_files: Mapping[str, str]  # .pth file name -> sha256 (executing or not)
    hooks: tuple[Hook, ...]

    @property
    def has_hooks(self) -> bool:
        return bool(self.hooks)

    def to_json(self, *, unsafe_allow_python_hooks: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "interpreter": self.interpreter,
            "interpreter_sha256": self.interpreter_sha256,
            "python_version": self.python_version,
            "distributions_sha256": _digest_map(self.distributions),
            "distributions": len(self.distributions),
            "modified_files": dict(self.modified_files),
            "foreign_modules": dict(self.foreign_modules),
            "pth_files": dict(self.pth_files),
            "hooks": [h.to_json() for h in self.hooks],
        }
        if unsafe_allow_python_hooks:
            doc["unsafe_allow_python_hooks"] = True
        return doc


def record_runtime(
    *,
    environ: Mapping[str, str] | None = None,
    modules: Mapping[str, Any] | None = None,
    package_dir: Path | None = None,
) -> RuntimeRecord:
    """Record this process's runtime (see the module docstring).

    ``environ`` and ``modules`` default to the process's own; ``package_dir`` to the
    installed sealserve package.
    """
    env = os.environ if environ is None else environ
    loaded = sys.modules if modules is None else modules
    if package_dir is None:
        import sealserve

        package_dir = Path(sealserve.__file__).resolve().parent
    interpreter = os.path.realpath(sys.executable)
    modified: dict[str, str] = {}
    foreign: dict[str, str] = {}
    covered = (os.path.realpath(package_dir), *_stdlib_dirs())
    for name, module in sorted(loaded.items(), key=lambda kv: kv[0]):
        file = getattr(module, "__file__", None)
        if not isinstance(file, str):
            continue
        kind, path, digest = _classify(file, covered)
        if kind == "modified":
            modified[path] = digest
        elif kind == "foreign":
            foreign[name] = digest
    pth = _pth_files()
    return RuntimeRecord(
        interpreter=interpreter,
        interpreter_sha256=_file_sha256(Path(interpreter)),
        python_version=sys.version.split()[0],
        distributions=_distributions(),
        modified_files=modified,
        foreign_modules=foreign,
        pth_files={p.name: digest for p, (digest, _) in pth.items()},
        hooks=tuple(_hooks(env, loaded, pth)),
    )


def check_hooks(
    record: RuntimeRecord, *, real_platform: bool, unsafe_allow_python_hooks: bool
) -> None:
    """The start-up decision: on a real platform (configfs-tsm) a process with a hook
    does not start unless ``unsafe_allow_python_hooks``. Raises ConfigError naming
    the hooks."""
    if not real_platform or not record.has_hooks or unsafe_allow_python_hooks:
        return
    named = ", ".join(f"{h.kind} {h.name}" for h in record.hooks[:8])
    raise ConfigError(
        f"python hooks present on a real platform: {named}",
        remedy="Start the server from the measured image with a clean environment (no "
        "PYTHONPATH, LD_PRELOAD, ...; no sitecustomize/usercustomize or executing .pth "
        "file). unsafe_allow_python_hooks = true starts it anyway, and the attested "
        "manifest says so.",
    )


# --- parts ------------------------------------------------------------------------


def _hooks(
    env: Mapping[str, str], loaded: Mapping[str, Any], pth: Mapping[Path, tuple[str, bool]]
) -> Iterable[Hook]:
    for knob in ENV_KNOBS:
        value = env.get(knob)
        if value:
            yield Hook("env", knob, value)
    for name in CUSTOMIZE_MODULES:
        path = _module_file(loaded.get(name)) if name in loaded else None
        if path is None:
            try:
                spec = importlib.util.find_spec(name)
            except (ImportError, ValueError):
                spec = None
            origin = spec.origin if spec is not None else None
            path = Path(origin) if origin and os.path.isfile(origin) else None
        if path is not None or name in loaded:
            yield Hook("customize", name, _file_sha256(path) if path is not None else "loaded")
    for path, (digest, executes) in pth.items():
        if executes:
            yield Hook("pth", path.name, digest)


def _pth_files() -> dict[Path, tuple[str, bool]]:
    out: dict[Path, tuple[str, bool]] = {}
    dirs = list(dict.fromkeys([*site.getsitepackages(), site.getusersitepackages()]))
    for directory in dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.endswith(".pth"):
                path = Path(directory, name)
                data = _read(path)
                executes = any(
                    line.startswith((b"import ", b"import\t")) for line in data.splitlines()
                )
                out[path] = (hashlib.sha256(data).hexdigest(), executes)
    return out


@functools.cache
def _distributions() -> dict[str, str]:
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"] or "?"
        record = dist.read_text("RECORD") or ""
        out[f"{name}=={dist.version}"] = hashlib.sha256(record.encode()).hexdigest()
    return dict(sorted(out.items()))


@functools.cache
def _distribution_files() -> dict[str, str]:
    """Every file an installed distribution's RECORD lists (normalised absolute path)
    -> its recorded SHA-256 (hex; empty when RECORD gives none). Cached: installations
    do not change under a running process. Paths are joined, not resolved (one stat
    per file would cost seconds for a large environment)."""
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        base = str(dist.locate_file(""))
        for f in dist.files or ():
            digest = ""
            if f.hash is not None and f.hash.mode == "sha256":
                raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
                digest = raw.hex()
            out[os.path.normpath(os.path.join(base, str(f)))] = digest
    return out


@functools.cache
def _stdlib_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[k]) for k in ("stdlib", "platstdlib") if k in paths)


def _module_file(module: Any) -> Path | None:
    name = getattr(module, "__file__", None)
    if not isinstance(name, str) or not os.path.isfile(name):
        return None
    return Path(os.path.realpath(name))


def _under(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root + os.sep) for root in roots)


@functools.lru_cache(maxsize=16384)
def _classify(file: str, covered: tuple[str, ...]) -> tuple[str, str, str]:
    """(kind, path, digest) of a loaded module's file: "package"/"stdlib" (covered
    elsewhere), "distribution" (matches its RECORD), "modified", "foreign" or "none"
    (no file). Cached by name: what matters is the file as it was loaded, and a
    module is loaded once."""
    owners = _distribution_files()
    path = os.path.normpath(os.path.abspath(file))
    expected = owners.get(path)
    if expected is None and not _under(path, covered):
        path = os.path.realpath(path)  # through symlinks, then look again
        expected = owners.get(path)
    if not os.path.isfile(path):
        return "none", path, ""  # namespace packages, frozen modules
    if expected is not None:
        actual = _file_sha256(Path(path))
        return ("modified" if expected and actual != expected else "distribution"), path, actual
    if _under(path, covered):
        return "covered", path, ""
    return "foreign", path, _file_sha256(Path(path))


@functools.lru_cache(maxsize=8192)
def _file_sha256_cached(path: Path, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(_read(path)).hexdigest()


def _file_sha256(path: Path) -> str:
    try:
        st = path.stat()
    except OSError:
        return "unreadable"
    return _file_sha256_cached(path, st.st_size, st.st_mtime_ns)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _digest_map(values: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(values):
        h.update(f"{key}\0{values[key]}\n".encode())
    return h.hexdigest()
