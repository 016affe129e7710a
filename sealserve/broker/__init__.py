"""sealserve.broker: the key broker (its own process).

- ``store``: KeyStore, data keys sealed at rest under the operator's master key
- ``nonces``: NonceBook, single-use expiring challenges
- ``core``: KeyBroker, release protocol and administration (transport-free)
- ``service``: the gRPC adapter; ``app``: BrokerServer, build_broker
- ``settings``: BrokerSettings (TOML + SEALSERVE_BROKER_*)
- ``admin_client``: BrokerAdmin, the admin API over gRPC (used by the CLI)

The enclave side of the protocol is ``sealserve.enclave.key_release``.
"""
