"""Anti-extraction defenses, no gRPC: one room per story (docs/architecture.md).

``guard`` (the two calls the server makes: admit, release) -> ``quota`` + ``challenge``
(admission) and ``release/`` (what every answer goes through) -> ``escalation``
(detector scores -> status), ``detect/``, ``watermark/``, ``audit/`` -> ``store/``
(shared state) -> ``status``, ``limits``, ``outputs`` (vocabulary). ``config`` is the
``[defense]`` table as typed models.
"""
