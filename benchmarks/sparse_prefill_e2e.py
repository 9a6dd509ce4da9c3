"""End-to-end prefill of a whole model with InfLLM v2 vs dense attention (issue 4 #6).

Loads a model folder (default: the bundled demo model), makes a dense and a sparse copy of it
(the same weights; the sparse one gets `sparse_config` with the published defaults, or
--sparse-* overrides), and times one prefill of a --length-token prompt made of real text
(books of ../shared/data/gutenberg, concatenated) with `logits_to_keep=1`, alternating the two
--repeats times in the same process. The model's `max_position_embeddings` is raised to the
length when needed (plain RoPE positions past the trained range: this measures speed, not
quality; see the retrieval evaluation for what the model can do at that length).
Also prints how far the sparse model's next-token distribution is from the dense one.
Prints last: RESULT e2e_sparse_prefill_speedup_<length/1024>k=<dense / sparse seconds>.
Usage: python benchmarks/sparse_prefill_e2e.py [--model DIR] [--length 32768] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import torch

from minicpm4 import loading
from minicpm4.model.config import SparseConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg"


def prompt_ids(tok, length: int) -> torch.Tensor:
    ids: list[int] = []
    for book in sorted(BOOKS.glob("*.txt")):
        ids.extend(tok.encode(book.read_text(encoding="utf-8")))
        if len(ids) >= length:
            break
    if len(ids) < length:
        raise ValueError(f"the books hold only {len(ids)} tokens, {length} asked")
    return torch.tensor([ids[:length]])


def with_config(model: MiniCPM4ForCausalLM, **changes) -> MiniCPM4ForCausalLM:
    twin = MiniCPM4ForCausalLM(model.config.replace(**changes)).to(model.dtype)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled demo)")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--sparse-topk", type=int, default=None)
    ap.add_argument("--sparse-dense-len", type=int, default=None)
    args = ap.parse_args()
    folder = Path(args.model) if args.model else loading.BUNDLED_MODEL
    base = MiniCPM4ForCausalLM.from_pretrained(folder, dtype=args.dtype).eval()
    tok = loading.load_tokenizer(None, folder)
    cfg = base.config
    overrides = {k: v for k, v in (("topk", args.sparse_topk),
                                   ("dense_len", args.sparse_dense_len)) if v is not None}
    sparse_cfg = dataclasses.replace(SparseConfig(), **overrides)
    positions = max(cfg.max_position_embeddings, args.length)
    dense = with_config(base, max_position_embeddings=positions, sparse_config=None)
    sparse = with_config(base, max_position_embeddings=positions, sparse_config=sparse_cfg)
    ids = prompt_ids(tok, args.length)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {folder} ({cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, head dim {cfg.head_dim_}, "
          f"{args.dtype}); prompt {args.length} tokens of {BOOKS.name}; {sparse_cfg}")
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    logits = {}
    with torch.no_grad():
        for rep in range(args.repeats):
            order = ["dense", "sparse"] if rep % 2 == 0 else ["sparse", "dense"]
            for name in order:
                model = dense if name == "dense" else sparse
                t0 = time.perf_counter()
                logits[name] = model(ids, logits_to_keep=1)[0, -1]
                times[name].append(time.perf_counter() - t0)
                print(f"  rep {rep} {name}: {times[name][-1]:.1f}s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    p, q = logits["dense"].log_softmax(-1), logits["sparse"].log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum())
    same = int(logits["dense"].argmax()) == int(logits["sparse"].argmax())
    ratio = med["dense"] / med["sparse"]
    print(f"prefill {args.length} tokens: dense {med['dense']:.1f}s, sparse {med['sparse']:.1f}s "
          f"-> x{ratio:.2f}; next-token KL(dense || sparse) {kl:.4f} nats, same argmax: {same}")
    print(f"RESULT e2e_sparse_prefill_speedup_{args.length // 1024}k={ratio:.3f}")


if __name__ == "__main__":
    main()
