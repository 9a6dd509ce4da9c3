"""Inference: sampling, the generation loop, and (later) the batching engine (spec §4)."""
