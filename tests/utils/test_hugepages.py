"""Model weights moved into huge pages (utils/hugepages.py): the same tensors and values,
ties kept, bad cases left alone, and the pages really huge where the kernel allows it."""

from __future__ import annotations

import mmap

import pytest
import torch

from minicpm4.engine.config import EngineConfig
from minicpm4.engine.llm import LLM
from minicpm4.engine.request import SamplingParams
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.utils import hugepages
from tests.conftest import tiny_config


def _model(**overrides) -> MiniCPM4ForCausalLM:
    torch.manual_seed(0)
    model = MiniCPM4ForCausalLM(tiny_config(rope_scaling=None, **overrides))
    model.init_weights(seed=0)
    return model.bfloat16().eval()


def _anon_huge_kb(start: int, end: int) -> int:
    """AnonHugePages of the mappings of this process overlapping [start, end)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo < end and hi > start
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


def test_buffer_is_aligned_zeroed_and_huge_where_allowed():
    buf, advised = hugepages.huge_buffer(8 << 20)
    assert buf.dtype == torch.uint8 and buf.numel() == 8 << 20
    assert int(buf.count_nonzero()) == 0
    if not advised:
        pytest.skip("no MADV_HUGEPAGE here")
    assert buf.data_ptr() % hugepages.HUGE_PAGE == 0
    buf.fill_(1)
    if hugepages.thp_mode() not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {hugepages.thp_mode()!r} on this machine")
    assert _anon_huge_kb(buf.data_ptr(), buf.data_ptr() + buf.numel()) >= 2048


def test_zeros_like_torch_zeros_and_committed():
    pages = hugepages.zeros((4, 16, 2, 64 * 256), torch.bfloat16)  # 4 MB
    assert pages.shape == (4, 16, 2, 64 * 256) and pages.dtype == torch.bfloat16
    assert int(pages.count_nonzero()) == 0
    small = hugepages.zeros((3, 5), torch.float32)  # below a huge page: plain torch.zeros
    assert small.shape == (3, 5) and int(small.count_nonzero()) == 0
    if hugepages.thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        start = pages.data_ptr()  # touched at creation: already backed by huge pages
        assert _anon_huge_kb(start, start + pages.numel() * 2) >= 2048


def test_move_keeps_values_objects_and_outputs():
    model = _model()
    ids = torch.tensor([[3, 17, 99, 5, 42]])
    with torch.no_grad():
        before = model(ids)
    params = dict(model.named_parameters())
    values = {k: p.detach().clone() for k, p in params.items()}
    ptrs = {k: p.data_ptr() for k, p in params.items()}
    moved = hugepages.move_to_huge_pages(model)
    assert moved >= sum(p.numel() * p.element_size() for p in params.values())
    for k, p in model.named_parameters():
        assert p is params[k]  # the same Parameter objects (optimizers, hooks keep working)
        assert p.data_ptr() != ptrs[k]
        assert torch.equal(p, values[k])
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    starts = sorted(p.data_ptr() for p in model.parameters())
    assert starts[-1] - starts[0] < moved  # one region
    assert hugepages.move_to_huge_pages(model) == 0  # already moved


def test_tied_weights_stay_tied():
    model = _model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hugepages.move_to_huge_pages(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.embed_tokens.weight[0, 0] = 7.0
    assert float(model.lm_head.weight.detach()[0, 0]) == 7.0


def test_views_of_one_storage_are_left_alone():
    module = torch.nn.Module()
    base = torch.arange(64, dtype=torch.float32)
    module.a = torch.nn.Parameter(base[:32].view(4, 8))
    module.register_buffer("b", base[32:].view(4, 8))  # same storage, another start
    ptrs = (module.a.data_ptr(), module.b.data_ptr())
    assert hugepages.move_to_huge_pages(module) == 0
    assert (module.a.data_ptr(), module.b.data_ptr()) == ptrs


def test_sparse_tensors_stay_and_the_rest_moves():
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.randn(64, 64))
    module.register_buffer("s", torch.eye(8).to_sparse())
    sparse, values = module.s, module.w.detach().clone()
    assert hugepages.move_to_huge_pages(module) > 0
    assert module.s is sparse and torch.equal(module.w, values)


def test_switched_off_and_fallback(monkeypatch):
    model = _model()
    ptr = model.lm_head.weight.data_ptr()
    monkeypatch.setenv("MINICPM4_HUGE_PAGES", "0")
    assert hugepages.move_to_huge_pages(model) == 0
    assert model.lm_head.weight.data_ptr() == ptr
    monkeypatch.setenv("MINICPM4_HUGE_PAGES", "1")
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE", raising=False)  # an OS without the advice
    buf, advised = hugepages.huge_buffer(1 << 20)
    assert not advised and buf.numel() == 1 << 20
    values = model.lm_head.weight.detach().clone()
    assert hugepages.move_to_huge_pages(model) > 0  # one plain block: still consistent
    assert torch.equal(model.lm_head.weight, values)


def test_engine_moves_weights_and_decodes_the_same(monkeypatch):
    model, reference = _model(), _model()
    ptr, ref_ptr = model.lm_head.weight.data_ptr(), reference.lm_head.weight.data_ptr()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm = LLM(model, None, EngineConfig(max_num_seqs=2))
    assert model.lm_head.weight.data_ptr() != ptr
    monkeypatch.setenv("MINICPM4_HUGE_PAGES", "0")
    ref = LLM(reference, None, EngineConfig(max_num_seqs=2))
    assert reference.lm_head.weight.data_ptr() == ref_ptr
    prompts = [[3, 17, 99], [5, 42, 8, 9, 10]]
    got = llm.generate(prompts, [params] * 2)
    want = ref.generate(prompts, [params] * 2)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
