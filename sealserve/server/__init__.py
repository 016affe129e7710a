"""The server: a transport-free core and, in ``grpc/``, its gRPC adapters.

Core: ``dataplane`` (what one request does), ``engine`` + ``batcher`` (onnxruntime),
``repository`` and ``model_keys`` (what is served, and its keys), ``defenses`` (builds
the defense objects from ``[defense]``), ``manifest``, ``settings``, ``metrics``.
``app`` is the composition root: it builds the core and the adapters and wires them.
The core never imports ``grpc/`` or ``app`` (import-linter contracts in pyproject.toml).
"""
