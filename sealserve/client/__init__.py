"""sealserve client SDK. Importing it never imports onnxruntime."""

from sealserve.client.client import AsyncClient, Client

__all__ = ["AsyncClient", "Client"]
