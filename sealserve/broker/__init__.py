"""sealserve.broker"""
