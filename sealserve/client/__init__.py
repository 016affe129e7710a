"""sealserve.client"""
