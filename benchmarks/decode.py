"""Prefill and decode tokens/s at batch 1 vs transformers' LlamaForCausalLM.generate (issue 2 #5).

Both models hold the same random MiniCPM4-0.5B-shaped weights (ours as MiniCPM4, theirs as
Llama with the μP scalars folded in, `model/llama_export.py`) and decode greedily the same
prompt in the same process, alternating runs. The decode roofline is
    weight bytes read per token / read bandwidth measured in this run,
where the bandwidth is the rate of a full read (`sum`) of a 1 GiB buffer.

Prints per dtype: prefill tok/s, decode tok/s (ours, HF), speedup, % of roofline; and last
    RESULT decode_speedup_vs_hf=<min over dtypes of ours (compiled decode) / HF decode tok/s>
Our decode runs both ways: `generate(..., compile=True)` (engine/compiled_decode.py, the
fast path, `--compile` on the CLI) and eager. The read bandwidth is sampled between the timed
runs (this VM's bandwidth swings with its neighbours) and the median is the roofline's.
Usage: python benchmarks/decode.py [--dtypes float32,bfloat16] [--prompt-len 128]
       [--new-tokens 32] [--repeats 3] [--preset minicpm4-0.5b]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from minicpm4.engine.generate import generate_stream  # noqa: E402
from minicpm4.engine.request import SamplingParams  # noqa: E402
from minicpm4.loading import PRESETS  # noqa: E402
from minicpm4.model.llama_export import llama_config_dict, llama_state_dict  # noqa: E402
from minicpm4.model.transformer import MiniCPM4ForCausalLM  # noqa: E402


def read_bandwidth(samples: list[float], *, mib: int = 512, repeats: int = 5) -> None:
    """Append `repeats` measurements (bytes/s) of a full read (`sum`) of a fp32 buffer."""
    buf = torch.ones(mib * 2**20 // 4)
    buf.sum()
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        samples.append(buf.numel() * 4 / (time.perf_counter() - t0))


def weight_bytes_per_token(model: MiniCPM4ForCausalLM) -> int:
    """Every weight is read once per decoded token, except the embedding table (one row),
    which is read in full only when it doubles as the tied LM head."""
    total = 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name == "model.embed_tokens.weight" and not model.config.tie_word_embeddings:
            continue
        total += p.numel() * p.element_size()
    return total


def time_ours(model, prompt: list[int], new_tokens: int, *,
              compile: bool) -> tuple[float, float]:
    """(prefill seconds incl. first token, seconds per decoded token)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    stamps = []
    t0 = time.perf_counter()
    for _ in generate_stream(model, [prompt], params, compile=compile):
        stamps.append(time.perf_counter())
    assert len(stamps) == new_tokens
    return stamps[0] - t0, (stamps[-1] - stamps[0]) / (new_tokens - 1)


class _Stamps:
    """transformers streamer recording when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.first_put = True

    def put(self, value) -> None:
        if self.first_put:  # the prompt itself
            self.first_put = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_hf(hf, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    streamer = _Stamps()
    t0 = time.perf_counter()
    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                min_new_tokens=new_tokens, do_sample=False, streamer=streamer,
                pad_token_id=0)
    stamps = streamer.times
    assert len(stamps) == new_tokens, len(stamps)
    return stamps[0] - t0, (stamps[-1] - stamps[0]) / (new_tokens - 1)


def build_pair(preset: str, dtype: torch.dtype):
    import transformers
    cfg = PRESETS[preset]()
    ours = MiniCPM4ForCausalLM(cfg)
    ours.init_weights(seed=0)
    ours = ours.to(dtype).eval()
    hf_cfg = transformers.LlamaConfig(**llama_config_dict(cfg))
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    state = {k: v.clone() for k, v in llama_state_dict(ours, cfg).items()}
    hf.load_state_dict(state, strict=False, assign=True)
    hf.model.rotary_emb.__init__(hf_cfg)  # buffers were created on meta
    return ours, hf.to(dtype).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="minicpm4-0.5b", choices=sorted(PRESETS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    prompt = torch.randint(3, 73000, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    speedups = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        ours, hf = build_pair(args.preset, dtype)
        nbytes = weight_bytes_per_token(ours)
        bw_samples: list[float] = []
        t0 = time.perf_counter()
        time_ours(ours, prompt[:16], 4, compile=True)  # warm-up, includes compiling
        print(f"[{name}] compiled decode step built in {time.perf_counter() - t0:.1f}s "
              f"(once per process; excluded from the timings)")
        time_ours(ours, prompt[:16], 4, compile=False)
        time_hf(hf, prompt[:16], 4)
        runs: dict[str, list[tuple[float, float]]] = {"compiled": [], "eager": [], "hf": []}
        for _ in range(args.repeats):
            read_bandwidth(bw_samples)
            runs["compiled"].append(time_ours(ours, prompt, args.new_tokens, compile=True))
            runs["eager"].append(time_ours(ours, prompt, args.new_tokens, compile=False))
            runs["hf"].append(time_hf(hf, prompt, args.new_tokens))
        pre = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        dec = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
        read_bandwidth(bw_samples)
        bw = statistics.median(bw_samples)
        roofline_s = nbytes / bw
        speedup = dec["hf"] / dec["compiled"]
        speedups.append(speedup)
        print(f"[{name}] weights read/token {nbytes / 2**20:.0f} MiB; read bandwidth median "
              f"{bw / 1e9:.1f} GB/s (min {min(bw_samples) / 1e9:.1f}, max "
              f"{max(bw_samples) / 1e9:.1f}, {len(bw_samples)} samples between the runs) -> "
              f"roofline {roofline_s * 1e3:.1f} ms/token ({1 / roofline_s:.1f} tok/s)")
        print(f"[{name}] prefill {args.prompt_len} tokens: ours {args.prompt_len / pre['eager']:.1f} "
              f"tok/s, transformers {args.prompt_len / pre['hf']:.1f} tok/s "
              f"(x{pre['hf'] / pre['eager']:.2f})")
        for key, label in (("compiled", "ours compiled"), ("eager", "ours eager"),
                           ("hf", "transformers")):
            print(f"[{name}] decode {label:14s} {1 / dec[key]:6.2f} tok/s "
                  f"({dec[key] * 1e3:6.1f} ms/token)  x{dec['hf'] / dec[key]:.2f} vs "
                  f"transformers  {roofline_s / dec[key]:.0%} of roofline")
        del ours, hf
    print(f"RESULT decode_speedup_vs_hf={min(speedups):.3f}")


if __name__ == "__main__":
    main()
