"""A/B of the engine's CPU inference kernels, each against the path it replaces (issue 5 #5).

For one kernel switch (`--switch`), runs `LLM.generate` on `benchmarks/serve.py`'s workload
for a model and concurrency, alternately with the switch on and off (the order flipped every
repeat, the same weights, greedy), and prints every run, the medians and last
`RESULT engine_switch_<switch>_<model>_c<C>=<median on / median off>`.
Switches: fused (fused RMSNorm + residual, `kernels/fused_norm.py`, and fused RoPE,
`kernels/fused_rotary.py`), paged (`kernels/paged_attention.py`), greedy
(`kernels/greedy.py`), skinny (`kernels/skinny_linear.py`), lean (the lean decode forward,
`model/fast_decode.py`), rows160 (the AMX tile path's cut-over `skinny_linear.MAX_ROWS_AMX`
at 160 rows against 96: prefill chunks of 97-160 rows on the tiles instead of oneDNN),
cpploop (the lean decode step's layers in the C++ loop `csrc/decode_layers.cpp` against the
Python loop), token (steps with prompt chunks as one token-level call of that loop,
`fast_decode.token_logits`, against the grouped forward), hugepages (two engines over two
copies of the weights, each loaded as `benchmarks/serve.py` loads it: one moved into huge
pages with its KV pages there too, as `LLM` does, `utils/hugepages.py`; the other built with
`MINICPM4_HUGE_PAGES=0`, its weights where loading put them: the demo's in the private
mapping of its safetensors file, the 0.5B's in torch's 4 KB pages).
With `--fresh` every run gets a new engine, so that no run reuses the prompts' prefixes
cached by the runs before it (without it, only the first run prefills every prompt).
Usage: python benchmarks/engine_switches.py --switch paged [--model demo] [--concurrency 8]
       [--repeats 4] [--dtype bfloat16] [--fresh]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # noqa: E402  (the workloads and models of benchmarks/serve.py)

from minicpm4.engine.config import EngineConfig  # noqa: E402
from minicpm4.engine.llm import LLM  # noqa: E402
from minicpm4.engine.request import SamplingParams  # noqa: E402
from minicpm4.kernels import (fused_norm, fused_rotary, greedy, paged_attention,  # noqa: E402
                              skinny_linear)
from minicpm4.model import fast_decode  # noqa: E402
from minicpm4.tokenizer import Tokenizer  # noqa: E402

SWITCHES = {  # name: [(module, attribute, value on, value off)]
    "fused": [(fused_norm, "FUSED_NORM", True, False),
              (fused_rotary, "FUSED_ROTARY", True, False)],
    "paged": [(paged_attention, "PAGED_DECODE", True, False)],
    "greedy": [(greedy, "GREEDY_OP", True, False)],
    "lean": [(fast_decode, "FAST_DECODE", True, False)],
    "skinny": [(skinny_linear, "SKINNY_LINEAR", True, False)],
    "rows160": [(skinny_linear, "MAX_ROWS_AMX", 160, 96)],
    "cpploop": [(fast_decode, "DECODE_LAYERS", True, False)],
    "token": [(fast_decode, "TOKEN_STEPS", True, False)],
    "hugepages": [],  # two engines (module docstring)
}


def _engine(model, tokenizer, C: int, huge_pages: bool) -> LLM:
    before = os.environ.get("MINICPM4_HUGE_PAGES")
    os.environ["MINICPM4_HUGE_PAGES"] = "1" if huge_pages else "0"
    try:
        return LLM(model, tokenizer, EngineConfig(max_num_seqs=C))
    finally:
        if before is None:
            del os.environ["MINICPM4_HUGE_PAGES"]
        else:
            os.environ["MINICPM4_HUGE_PAGES"] = before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switch", choices=sorted(SWITCHES), required=True)
    ap.add_argument("--model", choices=sorted(serve.WORKLOADS), default="demo")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--fresh", action="store_true",
                    help="a new engine per run (no prefix reuse from the runs before: every "
                         "prompt is prefilled, as a server sees new prompts)")
    args = ap.parse_args()
    model = serve.load_model(args.model, getattr(torch, args.dtype))
    w = serve.WORKLOADS[args.model]
    C = args.concurrency
    work = serve.workload(max(w["min_requests"], w["requests_per_slot"] * C),
                          model.config.vocab_size, w["prompt_len"], w["max_tokens"], seed=C)
    tok = Tokenizer.from_pretrained(serve.BUNDLED_TOKENIZER)
    # hugepages: the "off" engine gets its own copy of the weights, loaded as the "on" one
    # was (the demo's: mapped from its safetensors file) and left where loading put them
    huge = args.switch == "hugepages"
    models = {True: model,
              False: serve.load_model(args.model, getattr(torch, args.dtype)) if huge else model}
    llms = {True: _engine(model, tok, C, True)}
    llms[False] = _engine(models[False], tok, C, False) if huge else llms[True]
    prompts = [p for p, _ in work]
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in work]
    tokens = sum(m for _, m in work)
    for llm in {id(x): x for x in llms.values()}.values():
        llm.generate(prompts[:1], params[:1])  # warm-up: kernel builds, allocations
    runs: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list[list[int]]] = {}
    for rep in range(args.repeats):
        for on in ((True, False) if rep % 2 == 0 else (False, True)):
            for module, flag, value_on, value_off in SWITCHES[args.switch]:
                setattr(module, flag, value_on if on else value_off)
            if args.fresh:
                llms[on] = _engine(models[on], tok, C, on or not huge)
                llms[on].generate(prompts[:1], params[:1])
            llm = llms[on]
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params)
            runs[on].append(tokens / (time.perf_counter() - t0))
            outputs[on] = [o.token_ids for o in outs]
    for module, flag, value_on, _ in SWITCHES[args.switch]:
        setattr(module, flag, value_on)
    on, off = statistics.median(runs[True]), statistics.median(runs[False])
    print(f"# {args.model} C={C} {args.dtype}, {len(work)} requests, {tokens} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# switch {args.switch} on : " + " ".join(f"{x:.1f}" for x in runs[True]) + " tok/s")
    print(f"# switch {args.switch} off: " + " ".join(f"{x:.1f}" for x in runs[False]) + " tok/s")
    same = sum(a == b for a, b in zip(outputs[True], outputs[False]))
    print(f"median on {on:.1f} tok/s, off {off:.1f} tok/s; same greedy tokens in {same} of "
          f"{len(work)} requests")
    print(f"RESULT engine_switch_{args.switch}_{args.model}_c{C}={on / off:.3f}")


if __name__ == "__main__":
    main()
