"""The Open Inference Protocol over HTTP/REST (docs/rest.md)."""
