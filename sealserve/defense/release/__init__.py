"""The release room: what happens to every answer of a defended model.

Owns the defense profiles and their ``[defense.profiles]`` parsing, the output
transforms (rounding, top-k, label-only, keyed noise, reverse sigmoid, the input
coarsener), and the hot path :class:`~sealserve.defense.release.pipeline.OutputDefenses`
that the guard calls on each batch: detect, decide the account's status, perturb,
watermark, audit.
"""
