"""sealserve.cli"""
