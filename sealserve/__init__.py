"""sealserve: serve proprietary ONNX models so that they cannot be stolen."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sealserve")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.1.0"

__all__ = ["__version__"]
