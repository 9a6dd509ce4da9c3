"""Prefill and decode tokens/s at batch 1 vs transformers' LlamaForCausalLM.generate (issue 2 #5).

Both models hold the same random MiniCPM4-0.5B-shaped weights (ours as MiniCPM4, theirs as
Llama with the μP scalars folded in, `model/llama_export.py`) and decode greedily the same
prompt in the same process, alternating runs. The decode roofline is
    weight bytes read per token / read bandwidth measured in this run,
where the bandwidth is the rate of a full read (`sum`) of a 1 GiB buffer.

Prints per dtype: prefill tok/s, decode tok/s (ours, HF), speedup, % of roofline; and last
    RESULT decode_speedup_vs_hf=<min over dtypes of ours/HF decode tok/s>
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


def read_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s of a full read of a `gib`-GiB fp32 buffer (median of `repeats`)."""
    buf = torch.ones(int(gib * 2**30) // 4)
    buf.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t0)
    return buf.numel() * 4 / statistics.median(times)


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


def time_ours(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds incl. first token, seconds per decoded token)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    stamps = []
    t0 = time.perf_counter()
    for _ in generate_stream(model, [prompt], params):
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
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch "
          f"{torch.__version__}, threads {torch.get_num_threads()}")
    bw = read_bandwidth()
    print(f"measured read bandwidth: {bw / 1e9:.2f} GB/s")
    prompt = torch.randint(3, 73000, (args.prompt_len,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    speedups = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        ours, hf = build_pair(args.preset, dtype)
        nbytes = weight_bytes_per_token(ours)
        roofline_s = nbytes / bw
        time_ours(ours, prompt[:16], 4)  # warm-up
        time_hf(hf, prompt[:16], 4)
        runs_ours, runs_hf = [], []
        for _ in range(args.repeats):
            runs_ours.append(time_ours(ours, prompt, args.new_tokens))
            runs_hf.append(time_hf(hf, prompt, args.new_tokens))
        pre_o = statistics.median(r[0] for r in runs_ours)
        dec_o = statistics.median(r[1] for r in runs_ours)
        pre_h = statistics.median(r[0] for r in runs_hf)
        dec_h = statistics.median(r[1] for r in runs_hf)
        speedup = dec_h / dec_o
        speedups.append(speedup)
        print(f"[{name}] weights read/token {nbytes / 2**20:.0f} MiB -> roofline "
              f"{roofline_s * 1e3:.1f} ms/token ({1 / roofline_s:.1f} tok/s)")
        print(f"[{name}] prefill {args.prompt_len} tokens: ours {args.prompt_len / pre_o:.1f} "
              f"tok/s, transformers {args.prompt_len / pre_h:.1f} tok/s "
              f"(x{pre_h / pre_o:.2f})")
        print(f"[{name}] decode: ours {1 / dec_o:.2f} tok/s ({dec_o * 1e3:.1f} ms), "
              f"transformers {1 / dec_h:.2f} tok/s ({dec_h * 1e3:.1f} ms), "
              f"speedup x{speedup:.2f}, roofline fraction ours {roofline_s / dec_o:.0%} "
              f"transformers {roofline_s / dec_h:.0%}")
        del ours, hf
    print(f"RESULT decode_speedup_vs_hf={min(speedups):.3f}")


if __name__ == "__main__":
    main()
