"""kernels/cpu_ext.py: the C++ kernels build on demand and fail soft (docs/kernels.md)."""

from __future__ import annotations

import pytest

from minicpm4.kernels import cpu_ext


def test_disabled_by_env_never_builds(monkeypatch) -> None:
    monkeypatch.setattr(cpu_ext, "_STATE", {})
    monkeypatch.setenv("MINICPM4_CPU_EXT", "0")
    monkeypatch.setattr(cpu_ext, "_build", lambda name: pytest.fail("built while disabled"))
    assert cpu_ext.load("sparse_attn") is False


def test_a_broken_source_warns_and_falls_back(monkeypatch, tmp_path) -> None:
    (tmp_path / "broken.cpp").write_text("this is not C++;\n")
    monkeypatch.setattr(cpu_ext, "_STATE", {})
    monkeypatch.setattr(cpu_ext, "CSRC", tmp_path)
    monkeypatch.setenv("MINICPM4_EXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MINICPM4_CPU_EXT", raising=False)
    with pytest.warns(RuntimeWarning, match="building the C\\+\\+ kernel 'broken' failed"):
        assert cpu_ext.load("broken") is False
    assert cpu_ext.load("broken") is False  # remembered: no second build, no second warning




def test_preload_loads_every_inference_kernel() -> None:
    got = cpu_ext.preload()
    assert set(got) == set(cpu_ext.INFERENCE_EXTENSIONS)
    for name, ok in got.items():
        assert ok == cpu_ext.load(name)  # the remembered answer


def test_a_bf16_cpu_engine_preloads_and_an_fp32_one_does_not(monkeypatch) -> None:
    import torch

    from minicpm4.engine.llm import LLM
    from minicpm4.model.transformer import MiniCPM4ForCausalLM
    from tests.conftest import tiny_config

    calls = []
    monkeypatch.setattr(cpu_ext, "preload", lambda *a: calls.append(1) or {})
    model = MiniCPM4ForCausalLM(tiny_config(rope_scaling=None)).eval()
    LLM(model)
    assert not calls
    LLM(model.to(torch.bfloat16))
    assert calls == [1]
