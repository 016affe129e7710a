"""sealserve client SDK. Importing it never imports onnxruntime."""

from sealserve.client.client import AsyncClient, Client
from sealserve.client.tokens import RefreshingToken

__all__ = ["AsyncClient", "Client", "RefreshingToken"]
