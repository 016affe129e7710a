"""sealserve.server"""
