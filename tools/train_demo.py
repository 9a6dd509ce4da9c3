"""Train the small bundled demo model on ../shared/data/gutenberg with the real tokenizer.

A stopgap so that the README's main command runs a model that has seen English: issue 3's
training pipeline (μP optimizer groups, WSD, checkpoints, MTP head, evaluation) replaces it.
One book (austen-persuasion) is held out; its loss is printed at the end.
Usage: python tools/train_demo.py --out minicpm4/assets/demo --minutes 30
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from minicpm4.model.config import ModelConfig
from minicpm4.model.transformer import MiniCPM4ForCausalLM
from minicpm4.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HELD_OUT = "austen-persuasion.txt"


def load_tokens(tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    train, held = [], []
    for book in sorted((DATA / "gutenberg").glob("*.txt")):
        ids = tok.encode(book.read_text(encoding="utf-8")) + [2]
        (held if book.name == HELD_OUT else train).extend(ids)
    return torch.tensor(train), torch.tensor(held)


def batch(tokens: torch.Tensor, size: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - seq - 1, (size,), generator=gen)
    return torch.stack([tokens[s:s + seq + 1] for s in starts.tolist()])


def loss_of(model: MiniCPM4ForCausalLM, xy: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(xy[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), xy[:, 1:].flatten())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="minicpm4/assets/demo")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=0, help="stop after N steps (0: by time)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = Tokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "minicpm4" / "assets"
                                    / "tokenizer")
    train, held = load_tokens(tok)
    print(f"train tokens {len(train):,}, held-out ({HELD_OUT}) tokens {len(held):,}")
    cfg = ModelConfig(hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=4096, torch_dtype="bfloat16")
    model = MiniCPM4ForCausalLM(cfg)
    model.init_weights(seed=0)
    print(f"parameters {sum(p.numel() for p in model.parameters()):,}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    budget, start, step, warmup = args.minutes * 60, time.time(), 0, 100
    log = []
    while True:
        elapsed = time.time() - start
        frac = elapsed / budget if not args.steps else step / args.steps
        if frac >= 1.0:
            break
        # WSD: linear warmup, constant, exponential decay over the last 20% of the budget
        lr = args.lr * min(1.0, (step + 1) / warmup)
        if frac > 0.8:
            lr *= 0.1 ** ((frac - 0.8) / 0.2)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_of(model, batch(train, args.batch, args.seq, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            tps = step * args.batch * args.seq / (time.time() - start)
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} {tps:.0f} tok/s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 4), "lr": lr})
    model.eval()
    with torch.no_grad():
        gen_eval = torch.Generator().manual_seed(2)
        held_loss = sum(loss_of(model, batch(held, 8, args.seq, gen_eval)).item()
                        for _ in range(8)) / 8
    print(f"held-out loss {held_loss:.3f}, perplexity {math.exp(held_loss):.1f}")
    out = Path(args.out)
    model.save_pretrained(out, dtype="bfloat16")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "added_tokens.json", "generation_config.json"):
        (out / name).unlink(missing_ok=True)
    (out / "training_log.json").write_text(json.dumps(
        {"args": vars(args), "steps": step, "held_out_book": HELD_OUT,
         "held_out_loss": held_loss, "curve": log}, indent=1))


if __name__ == "__main__":
    main()
