"""Reading names out of X.509 certificates, one way for SEV-SNP and TDX chains."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

__all__ = ["common_name"]


def common_name(name: x509.Name) -> str:
    """The first CN of a name, or '' when it has none.

    Never a fallback to other attributes: chain code matches on this value (the TDX
    root and intermediate names), and a certificate without a CN must not match by
    carrying the expected text in another attribute.
    """
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""
