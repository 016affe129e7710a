"""sealserve.defense"""
