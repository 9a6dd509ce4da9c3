"""Just-in-time C++ CPU kernels (docs/kernels.md, "C++ CPU kernels").

Some CPU hot loops (InfLLM v2 stage 2, spec §2.2 step 6) need a fused loop that plain
PyTorch ops cannot express without materialising large temporaries. Their C++ sources live
in `minicpm4/kernels/csrc/`; `load(name)` compiles one with the system C++ compiler the first
time it is needed (torch.utils.cpp_extension, about 20-40 s) into a cache directory keyed by
the source, the torch version and the machine, then registers its ops under
`torch.ops.minicpm4_<name>`. Every such kernel has a pure-PyTorch path beside it; when the
build is impossible (no compiler, another platform) or disabled with
`MINICPM4_CPU_EXT=0`, `load` returns False once with a warning and callers take that path.
Ops are compiled with -O3 -march=native: the cache key includes the CPU model, so a cache
directory shared between different machines never runs code built for another CPU.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
_LOCK = threading.Lock()
_STATE: dict[str, bool] = {}


def enabled() -> bool:
    """False when MINICPM4_CPU_EXT=0 (always use the PyTorch paths)."""
    return os.environ.get("MINICPM4_CPU_EXT", "1") != "0"


def inference_op(name: str, *tensors: torch.Tensor | None) -> bool:
    """For the inference-only kernels' dispatchers: the given tensors (None ignored) are on
    the CPU with nothing to differentiate, and the extension `name` is on and built."""
    from minicpm4.kernels import needs_grad  # the package imports this module
    if any(t is not None and t.device.type != "cpu" for t in tensors) or needs_grad(*tensors):
        return False
    return enabled() and load(name)


def _cpu_model() -> str:
    """The CPU's model name and feature flags (a VM may hide features of the same model)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    info = [next((x for x in lines if x.startswith(key)), "") for key in ("model name", "flags")]
    return "|".join(info) if any(info) else (platform.processor() or platform.machine())


def cache_dir() -> Path:
    """Where built extensions go: $MINICPM4_EXT_CACHE, else ~/.cache/minicpm4/ext."""
    root = os.environ.get("MINICPM4_EXT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "minicpm4" / "ext"


INFERENCE_EXTENSIONS = ("skinny_gemm", "rms_norm", "rotary", "paged_attention", "greedy",
                        "decode_layers")
"""The kernels a bf16 CPU engine step may use (`preload`)."""


def preload(names=INFERENCE_EXTENSIONS) -> dict[str, bool]:
    """`load` each of `names` now (an engine calls it at start, so that a first build, ~15 s
    per kernel, happens before the first request rather than inside it)."""
    return {name: load(name) for name in names}


def load(name: str) -> bool:
    """Build (once) and load `csrc/<name>.cpp`; True when its ops are registered.

    Dispatchers call this on every op, so a known answer is returned without the lock."""
    state = _STATE.get(name)
    if state is not None:
        return state
    with _LOCK:
        if name in _STATE:
            return _STATE[name]
        ok = False
        if enabled() and platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
            try:
                ok = _build(name)
            except Exception as exc:  # any compiler / loader failure -> PyTorch fallback
                warnings.warn(f"minicpm4: building the C++ kernel {name!r} failed "
                              f"({type(exc).__name__}: {str(exc)[-400:]}); using the PyTorch "
                              "path instead", RuntimeWarning, stacklevel=2)
        _STATE[name] = ok
        return ok


def _build(name: str) -> bool:
    from torch.utils import cpp_extension

    src = CSRC / f"{name}.cpp"
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # shared includes
    key = hashlib.sha256(src.read_bytes() + headers + torch.__version__.encode()
                         + _cpu_model().encode()).hexdigest()[:16]
    build = cache_dir() / f"{name}_{key}"
    build.mkdir(parents=True, exist_ok=True)
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else []
    cpp_extension.load(name=f"minicpm4_{name}_{key}", sources=[str(src)],
                       extra_cflags=["-O3", "-ffast-math", "-fopenmp", *native],
                       extra_ldflags=["-fopenmp"], build_directory=str(build),
                       is_python_module=False, verbose=False)
    return True
