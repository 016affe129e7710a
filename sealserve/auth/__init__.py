"""sealserve.auth"""
