"""Model weights in transparent huge pages for CPU inference (issue 5: decode throughput).

A CPU decode step streams every weight from memory once, so its speed is the rate at which
the GEMMs read weights. With the 4 KB pages torch's allocator gets by default, that stream
crosses a page (and a TLB entry) every 4 KB; in 2 MB pages it crosses one every 2 MB. A
checkpoint loaded from safetensors is worse off: its tensors live in a private mapping of the
file, at whatever byte offset the file gives them (the demo's LM head starts 8-byte aligned,
so every 64-byte vector load of it spans two cache lines).

Linux hands out huge pages to a process's anonymous memory only where the process asks
(`/sys/kernel/mm/transparent_hugepage/enabled` is usually `madvise`), and only for memory not
yet touched. `move_to_huge_pages(module)` therefore maps one fresh private anonymous region
(2 MB aligned, `madvise(MADV_HUGEPAGE)` before the first touch), copies every parameter and
buffer of the module into it (each 4 KB aligned) and points each one at its copy
(`tensor.data = copy`: the same Parameter objects, so tied weights stay tied, values
bit-identical), one tensor at a time so that the old copies are freed as it goes. `zeros`
gives the KV pages the same treatment. Where huge pages cannot be had (another OS, THP
`never`) the region is still one aligned block of ordinary pages. `LLM` calls both on the
CPU; `MINICPM4_HUGE_PAGES=0` turns them off.

Measured on the project's 2-vCPU AMX Xeon (`benchmarks/engine_switches.py --switch
hugepages`, on / off medians of 4 alternating runs in one process, greedy tokens identical):
demo (mapped from its file when off) 1.132x at C = 1 and 1.083x at C = 8; 0.5B-shaped
(torch's 4 KB pages when off) 1.056x at C = 1 and 1.045x at C = 8.
"""

from __future__ import annotations

import math
import mmap
import os
import sys

import torch

HUGE_PAGE = 2 << 20
_ALIGN = 4096  # each tensor's start in the region (page aligned, beyond any SIMD need)
_MARK = "_minicpm4_huge_pages"


def enabled() -> bool:
    return os.environ.get("MINICPM4_HUGE_PAGES", "1") != "0"


def thp_mode() -> str | None:
    """The kernel's transparent huge page policy (always / madvise / never), None if unknown."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_buffer(nbytes: int) -> tuple[torch.Tensor, bool]:
    """A zeroed uint8 CPU tensor of `nbytes` starting on a 2 MB boundary of an anonymous
    mapping advised for huge pages, and whether the advice was taken; where it is not
    possible, a plain tensor and False. The tensor keeps the mapping alive."""
    advise = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes <= 0 or advise is None or not sys.platform.startswith("linux"):
        return torch.zeros(max(nbytes, 0), dtype=torch.uint8), False
    # private: shared anonymous memory is shmem, whose huge pages follow another policy
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    offset = -whole.data_ptr() % HUGE_PAGE
    try:
        region.madvise(advise, offset, nbytes)
        advised = True
    except OSError:
        advised = False
    return whole[offset:offset + nbytes], advised


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """`torch.zeros(shape, dtype=dtype)` on the CPU, in huge pages where they can be had (the
    engine's KV pages: paged attention reads them as decode reads the weights). Every page is
    touched here, as `torch.zeros` does: a pool too large for the machine fails at start-up,
    not under load, and no page fault lands inside a step."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not enabled() or nbytes < HUGE_PAGE:
        return torch.zeros(shape, dtype=dtype)
    buf, _ = huge_buffer(nbytes)
    return buf.view(dtype).view(shape).zero_()


def move_to_huge_pages(module: torch.nn.Module) -> int:
    """Move the CPU parameters and buffers of `module` into one huge-page region (module
    docstring). Returns the bytes moved (0: nothing done: switched off, already moved, or
    nothing on the CPU). Call it before the model's tensors are handed to anything that
    keeps references to them (packed layer lists, caches)."""
    if not enabled() or getattr(module, _MARK, False):
        return 0
    groups: dict[int, list[torch.Tensor]] = {}  # storage start -> the tensors there
    storages: dict[int, tuple] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return 0  # tensor subclasses (DTensor...) own their storage: left alone
        if t.device.type != "cpu" or t.numel() == 0 or t.layout != torch.strided \
                or t.is_quantized:
            continue  # sparse and quantized tensors stay where they are
        seen = storages.setdefault(t.untyped_storage().data_ptr(),
                                   (t.data_ptr(), t.shape, t.dtype))
        if seen != (t.data_ptr(), t.shape, t.dtype):
            return 0  # tensors that are views of one another: moving them would part them
        if t.is_contiguous():  # parameters() and buffers() yield each tensor once
            groups.setdefault(t.data_ptr(), []).append(t)
    if not groups:
        return 0
    offsets, total = {}, 0
    for ptr, ts in groups.items():
        offsets[ptr] = total
        total += -(-ts[0].nbytes // _ALIGN) * _ALIGN
    region, _ = huge_buffer(total)
    with torch.no_grad():
        for ptr, ts in groups.items():  # one tensor at a time: the old copy is freed as we go
            start = offsets[ptr]
            copy = region[start:start + ts[0].nbytes].view(ts[0].dtype).view(ts[0].shape)
            copy.copy_(ts[0])
            for t in ts:
                t.data = copy
    setattr(module, _MARK, True)
    return total
