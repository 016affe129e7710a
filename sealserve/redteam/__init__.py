"""sealserve.redteam"""
