"""The watermark room: prove a suspect model was trained on our answers.

Owns the marks (keyed selection of queries and their alternative answers), the
signal (a keyed tilt of scores), the sealed ledger that records both, the verifier
(match rate and binomial p-value against a suspect) and the replica check.
"""
