"""The gRPC adapters: protobuf in, transport-free core call, protobuf out.

Owns the OIP servicer, the Admin and Attestation services, the authenticating
registrar, the tensor codec and the one error-to-status adapter. Protobuf and grpc
never leave this package on the server side; the core (``sealserve.server``'s
other modules) does not import it, only the composition root (``server.app``) does.
"""
