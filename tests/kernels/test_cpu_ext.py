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


