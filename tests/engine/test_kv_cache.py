"""`engine/kv_cache.PagedBatch`: where a batch's new keys go, what the gathered path returns,
and refusals. Decode batches compute their page slots in plain Python; the gathered-path
tensors are built on first use; both must agree with the general slot formula."""

from __future__ import annotations

import pytest
import torch

from minicpm4.engine.kv_cache import BlockPool, PagedBatch
from tests.conftest import tiny_config

BS = 4  # tokens per page


def _pool() -> BlockPool:
    cfg = tiny_config(rope_scaling=None, num_hidden_layers=2)
    return BlockPool(cfg, num_blocks=32, block_size=BS, dtype=torch.float32)


def test_decode_slots_follow_the_block_tables() -> None:
    pool = _pool()
    tables = [[5, 9, 2], [7], [3, 4]]
    past = [9, 2, 4]  # token 9 -> block 2 of row 0 (page 2) slot 1; 2 -> page 7 slot 2; ...
    pb = PagedBatch(pool, tables, past, [1, 1, 1])
    assert pb._decode
    assert pb._new_slots.tolist() == [2 * BS + 1, 7 * BS + 2, 4 * BS + 0]
    assert torch.equal(pb._new_slots, pb._slots_of_new_tokens().view(-1))  # the general formula
    k_BKTH = torch.randn(3, pool.cfg.num_key_value_heads, 1, pool.cfg.head_dim_)
    pb.write(1, k_BKTH, -k_BKTH)
    for b, slot in enumerate(pb._new_slots.tolist()):
        page, i = divmod(slot, BS)
        assert torch.equal(pool.k[1][page, i], k_BKTH[b, :, 0])
        assert torch.equal(pool.v[1][page, i], -k_BKTH[b, :, 0])
    pages = pb.decode_pages(1)
    assert pages[3].tolist() == [10, 3, 5]  # keys per row, the new one included


def test_gathered_path_left_pads_and_reports_padding() -> None:
    pool = _pool()
    K, H = pool.cfg.num_key_value_heads, pool.cfg.head_dim_
    for page in range(pool.num_blocks):  # every stored key says where it lives
        pool.k[0][page] = (page * BS + torch.arange(BS)).float().view(BS, 1, 1)
    tables = [[6, 8], [11]]
    pb = PagedBatch(pool, tables, [5, 3], [2, 2])
    assert not pb._decode and pb.decode_pages(0) is None
    valid = pb.key_valid()
    assert valid.tolist() == [[True] * 5, [False, False, True, True, True]]
    k_new = torch.full((2, K, 2, H), -1.0)
    k_all, _ = pb.update(0, k_new, k_new.clone())
    assert k_all.shape == (2, K, 7, H)
    row0 = [6 * BS + i for i in range(4)] + [8 * BS]
    assert k_all[0, 0, :5, 0].tolist() == row0
    assert k_all[1, 0, 2:5, 0].tolist() == [11 * BS + i for i in range(3)]
    assert k_all[:, :, 5:].eq(-1).all()  # this forward's keys, written then gathered
    full = PagedBatch(pool, [[6, 8], [11, 12]], [5, 5], [1, 1])
    assert full.key_valid() is None


def test_refusals() -> None:
    pool = _pool()
    with pytest.raises(ValueError, match="same number of new tokens"):
        PagedBatch(pool, [[1], [2]], [2, 3], [1, 2])
    with pytest.raises(ValueError, match="no page for the decode token"):
        PagedBatch(pool, [[1]], [BS], [1])  # token BS needs a second page
