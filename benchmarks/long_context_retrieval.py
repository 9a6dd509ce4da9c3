"""Long-context pass-key retrieval, sparse (InfLLM v2) vs dense, before vs after long-context
training (issue 4 acceptance 6; spec §2.3 short-dense -> long-sparse, §1.3 context extension).

A random 5-digit pass key is planted (`minicpm4.data.long_context.plant`: the needle sentence
"The pass key is K. Remember it. K is the pass key.") at several depths of text from a
held-out book (default austen-persuasion, which the demo and the long-context stage never
trained on), and the question "What is the pass key? The pass key is" ends the prompt, followed
by the key itself. One teacher-forced forward per case (`logits_to_keep` = the answer's 6
tokens, never [T, vocab] logits) scores the key's 5 digits:

- acc: fraction of digits whose greedy (argmax over the whole vocabulary) prediction is right,
  each given the true earlier digits; exact: all five right;
- logp: mean log-probability of the key's digits.

Chance level comes from a no-needle case per length (same book text and question, the key never
shown): the model's guess of an unseen key (about 0.1 acc / ln(1/10) = -2.30 logp at best).
Keys come from `--seed` (a different stream from the training data's), and the book, the depths
(fixed 10/50/90%) and the lengths differ from training (2K-token chunks, random depths).

Each `--model LABEL=DIR` is loaded with `--context` (LongRoPE extension, spec §1.3) and run in
each `--modes` entry: "sparse" = the given InfLLM v2 config, "dense" = no sparse_config.
Prints a table, per-(model, mode, length) summaries, and last
`RESULT long_context_passkey_acc_after_sparse=<mean acc of the model labelled "after" in sparse
mode over all lengths and depths>` (the first model's, if none is labelled "after").
Usage: OMP_NUM_THREADS=2 nice -n 10 python benchmarks/long_context_retrieval.py \\
    --model before=minicpm4/assets/demo --model after=out/long/model --lengths 4096,8192,16384
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from minicpm4 import loading
from minicpm4.data.long_context import passkey_parts, plant, random_key
from minicpm4.model.checkpoint import load_pretrained
from minicpm4.model.config import SparseConfig
from minicpm4.model.hf import load_config

BOS = 1  # <s>, as `data tokenize` writes it
BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "gutenberg"


def score(model, ids: np.ndarray, answer: np.ndarray) -> dict:
    """Teacher-forced digit accuracy / log-prob of the key (answer = space token + digits)."""
    ids_BT = torch.from_numpy(ids)[None]
    with torch.no_grad():
        logits_BKV = model(ids_BT, logits_to_keep=len(answer)).float()
    logp_KV = torch.log_softmax(logits_BKV[0, :-1], dim=-1)  # predictions of answer[1:]
    digits = torch.from_numpy(answer[1:])
    pred = logp_KV.argmax(dim=-1)
    hits = (pred == digits).float()
    return {"acc": hits.mean().item(), "exact": float(bool(hits.all())),
            "logp": logp_KV.gather(1, digits[:, None]).mean().item(), "pred": pred.tolist()}


def _digit(tok, token_id: int) -> str:
    text = tok.decode([token_id]).strip()
    return text if len(text) == 1 and text.isdigit() else "_"


def cases(tok, book_ids: np.ndarray, length: int, depths: list[float], trials: int,
          rng: np.random.Generator):
    """(depth or None for the no-needle baseline, trial, ids, answer) for one length."""
    for trial in range(trials):
        parts = passkey_parts(tok, random_key(rng))
        room = length - len(parts.question) - len(parts.answer)
        start = int(rng.integers(0, len(book_ids) - room))
        hay = book_ids[start:start + room]
        for depth in depths:
            ids, _ = plant(hay, parts, depth, bos=BOS, length=length)
            yield depth, trial, ids, parts.answer
        if trial == 0:  # the baseline: same text and question, the key never shown
            base = np.concatenate([[BOS], hay[:room - 1], parts.question, parts.answer])
            yield None, trial, base.astype(np.int64), parts.answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", required=True, metavar="LABEL=DIR")
    ap.add_argument("--context", default="32k", help="--context of every model (spec §1.3)")
    ap.add_argument("--lengths", default="4096,8192,16384")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--trials", type=int, default=1, help="keys (and text offsets) per length")
    ap.add_argument("--modes", default="sparse,dense")
    ap.add_argument("--sparse-topk", type=int, default=12)
    ap.add_argument("--sparse-window", type=int, default=256)
    ap.add_argument("--sparse-dense-len", type=int, default=1024)
    ap.add_argument("--book", default=str(BOOKS / "austen-persuasion.txt"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--masked-max", type=int, default=8192,
                    help="sparse mode: stage 2 as one masked SDPA (the same attention, dense "
                         "cost, faster than gather on this CPU) up to this length, gather beyond")
    ap.add_argument("--json", default=None, help="also write every case here")
    args = ap.parse_args()
    lengths = [loading.parse_context(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= {"sparse", "dense"}:
        raise SystemExit(f"--modes takes sparse and/or dense, got {args.modes!r}")
    sparse = SparseConfig(topk=args.sparse_topk, window_size=args.sparse_window,
                          dense_len=args.sparse_dense_len)
    tok = loading.load_tokenizer(None, None)
    book_ids = np.asarray(tok.encode(Path(args.book).read_text(encoding="utf-8"),
                                     add_special_tokens=False), dtype=np.int64)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; book {Path(args.book).name} "
          f"({len(book_ids)} tokens); context {args.context}; sparse {sparse} "
          f"(visible <= {sparse.num_selected * sparse.block_size} tokens/query)", flush=True)
    rows = []
    for spec in args.model:
        label, _, folder = spec.partition("=")
        base_cfg = loading.apply_context(load_config(folder), args.context)
        for mode in modes:
            cfg = base_cfg.replace(sparse_config=sparse if mode == "sparse" else None)
            model = load_pretrained(folder, dtype="float32", config=cfg).eval()
            for length in lengths:
                if length > cfg.max_position_embeddings:
                    raise SystemExit(f"{length} exceeds --context {args.context}")
                rng = np.random.default_rng([args.seed, length])  # same keys for every model
                for layer in model.model.layers:
                    layer.self_attn.sparse_backend = \
                        "masked" if length <= args.masked_max else "gather"
                for depth, trial, ids, answer in cases(tok, book_ids, length, depths,
                                                        args.trials, rng):
                    t0 = time.perf_counter()
                    out = score(model, ids, answer)
                    row = {"model": label, "mode": mode, "length": length, "depth": depth,
                           "trial": trial, "key": tok.decode(answer[1:].tolist()),
                           "pred": "".join(_digit(tok, i) for i in out.pop("pred")), **out,
                           "seconds": time.perf_counter() - t0}
                    rows.append(row)
                    where = "none" if depth is None else f"{depth:.0%}"
                    print(f"{label:>7} {mode:>6} {length:>6} needle@{where:>4} key {row['key']} "
                          f"pred {row['pred']:>5}  acc {row['acc']:.2f}  logp {row['logp']:7.3f}"
                          f"  ({row['seconds']:.1f}s)", flush=True)
            del model
    summarize(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")
    labels = [m.partition("=")[0] for m in args.model]
    target = "after" if "after" in labels else labels[0]
    accs = [r["acc"] for r in rows if r["model"] == target and r["mode"] == "sparse"
            and r["depth"] is not None]
    value = statistics.mean(accs) if accs else float("nan")
    print(f"RESULT long_context_passkey_acc_after_sparse={value:.3f}")


def summarize(rows: list[dict]) -> None:
    print("\n| model | mode | length | digit acc (needle) | exact | logp (needle) | "
          "digit acc (no needle) | logp (no needle) | s/forward |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    keys = sorted({(r["model"], r["mode"], r["length"]) for r in rows},
                  key=lambda k: ([r["model"] for r in rows].index(k[0]), k[1] != "sparse", k[2]))
    for model, mode, length in keys:
        group = [r for r in rows if (r["model"], r["mode"], r["length"]) == (model, mode, length)]
        hit = [r for r in group if r["depth"] is not None]
        none = [r for r in group if r["depth"] is None]
        mean = lambda rs, k: statistics.mean(r[k] for r in rs) if rs else math.nan
        print(f"| {model} | {mode} | {length} | {mean(hit, 'acc'):.2f} | "
              f"{sum(r['exact'] for r in hit):.0f}/{len(hit)} | {mean(hit, 'logp'):.2f} | "
              f"{mean(none, 'acc'):.2f} | {mean(none, 'logp'):.2f} | "
              f"{mean(group, 'seconds'):.1f} |")


if __name__ == "__main__":
    main()
