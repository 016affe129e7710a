"""sealserve.attestation"""
