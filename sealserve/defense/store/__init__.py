"""The store room: shared defense state (quota windows, account status, detector blobs,
single-use nonces) behind one interface.

Owns the :class:`~sealserve.defense.store.base.StateStore` contract and its backends:
memory (tests, one process), SQLite (one machine), Redis and Redis Cluster (several
replicas), and the factory that opens the configured one.
"""
