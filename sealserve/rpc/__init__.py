"""What every sealserve gRPC service shares: the one error-to-status adapter.

The server (``sealserve.server.grpc``) and the key broker (``sealserve.broker``) are
separate processes that never import each other; both map errors through
:mod:`sealserve.rpc.status`, so a given error reads the same from either.
"""
