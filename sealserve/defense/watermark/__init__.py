"""The watermark room: prove a suspect model was trained on our answers.

Owns the marks (keyed selection of queries and their alternative answers), the
signal (a keyed tilt of scores), the band marks (keyed runner-up flips where the model
is unsure), the sealed ledger that records them, the verifier (exact tests against a
suspect) and the replica check.
"""
