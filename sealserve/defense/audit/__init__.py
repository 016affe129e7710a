"""The audit room: the signed, MAC-chained log of released answers.

Owns writing the log (:mod:`.log`), verifying it offline with the public key
(:mod:`.verify`) and summarising a verified log per account (:mod:`.report`).
"""
