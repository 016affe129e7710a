"""sealserve.enclave"""
