"""Training data (architecture §3 `data/`): corpus -> token shards -> packed, resumable batches.

`tokenize` writes memory-mapped uint32 shards with an index; `packing` turns the token stream
into fixed-length sequences with per-document positions, ids, labels and masks; `loader` serves
them deterministically, sharded over data-parallel ranks. This room never imports `model/`.
"""
