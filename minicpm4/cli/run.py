"""`minicpm4 generate | chat | info`: text generation in the terminal and model summaries
(architecture §3 "cli"; spec §8 for the sampling parameters)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

from minicpm4 import loading
from minicpm4.engine.generate import generate_stream
from minicpm4.engine.request import SamplingParams

Handler = Callable[[argparse.Namespace], int]


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", default=None,
                   help="HF-format MiniCPM4 folder (config.json + safetensors [+ tokenizer]); "
                        "default: the bundled model")
    g.add_argument("--random", metavar="PRESET", choices=sorted(loading.RANDOM_PRESETS),
                   help="use randomly initialised weights of a preset shape instead of "
                        "--model (smoke tests, benchmarks); output is gibberish")
    g.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer folder (default: the model folder, else the bundled "
                        "MiniCPM4 tokenizer)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights/activations dtype; auto = checkpoint dtype (float16 is "
                        "refused on CPU, where it is ~100x slower)")
    add_context_sparse_args(p)
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile: about 2x faster batch-1 "
                        "decoding after a one-time compile (15-45 s on a CPU)")


def add_context_sparse_args(p: argparse.ArgumentParser, *, lse: bool = True) -> None:
    """`--context` (spec §1.3) and the InfLLM v2 switches (spec §2.1); resolved by
    `loading.apply_context` / `loading.apply_sparse_args` (generate, chat, eval, train)."""
    p.add_argument_group("context length (spec §1.3)").add_argument(
        "--context", default=None, metavar="N",
        help="extend the model to N positions (e.g. 32k, 64k, 128k or 40000): sets "
             "max_position_embeddings and derives LongRoPE long factors by YaRN's by-parts rule "
             "from the config's own factors (for MiniCPM4-8B, 128k gives a derived list, not "
             "the README's published one); a length the model already reaches changes nothing")
    sp = p.add_argument_group("InfLLM v2 sparse attention (spec §2)")
    sp.add_argument("--sparse", action="store_true",
                    help="enable block-sparse attention with the published defaults (top-k 64 "
                         "+ 32 local blocks of 64, 1 sink block, dense below 8192 tokens) "
                         "unless the checkpoint's sparse_config says otherwise")
    sp.add_argument("--dense", action="store_true",
                    help="ignore the checkpoint's sparse_config: dense attention everywhere")
    sp.add_argument("--sparse-topk", type=int, default=None, metavar="K",
                    help="blocks chosen by score on top of the local window (implies --sparse)")
    sp.add_argument("--sparse-window", dest="sparse_window_size", type=int, default=None,
                    metavar="TOKENS", help="local window in tokens (implies --sparse)")
    sp.add_argument("--sparse-dense-len", type=int, default=None, metavar="TOKENS",
                    help="attend densely below this many tokens; -1 = always sparse "
                         "(implies --sparse)")
    sp.add_argument("--sparse-init-blocks", type=int, default=None, metavar="N",
                    help="leading (sink) blocks always attended (implies --sparse)")
    if lse:
        sp.add_argument("--sparse-lse", choices=["approx", "exact"], default=None,
                        help="selection normaliser: coarse-key approximation (default) or exact")


def add_sampling_args(p: argparse.ArgumentParser, *, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")


def sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop), seed=args.seed, ignore_eos=args.ignore_eos)


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add generate / chat / info to `sub`; returns their handlers by name."""
    gen = sub.add_parser("generate", help="complete one or more prompts",
                         description="Complete prompts; several --prompt run as one batch.")
    add_model_args(gen)
    gen.add_argument("--prompt", action="append", default=None,
                     help="prompt text (repeatable; '-' reads stdin)")
    gen.add_argument("--chat-template", action="store_true",
                     help="wrap each prompt as a user turn of the chat template")
    gen.add_argument("--no-stream", action="store_true", help="print only the final texts")
    add_sampling_args(gen, temperature=0.0)

    chat = sub.add_parser("chat", help="interactive chat (ChatML, streaming)",
                          description="Chat in the terminal. /reset clears the history, "
                                      "/exit or Ctrl-D quits.")
    add_model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(chat, temperature=0.7)

    info = sub.add_parser("info", help="parameter count, memory estimate, config summary",
                          description="Summarise a model folder, a config.json or a preset.")
    info.add_argument("--model", metavar="PATH", default=None,
                      help="model folder or config.json (default: the bundled model)")
    info.add_argument("--preset", choices=sorted(loading.PRESETS), default=None)
    info.add_argument("--context", default=None, metavar="N",
                      help="context length (e.g. 4096, 32k, 128k) for the KV-cache estimate "
                           "(default: max positions); beyond max positions the config is "
                           "extended as `generate --context` does")
    return {"generate": _cmd_generate, "chat": _cmd_chat, "info": _cmd_info}


def _cmd_generate(args: argparse.Namespace) -> int:
    model, tok = loading.load_model_and_tokenizer(args)
    prompts = args.prompt or ["It is a truth universally acknowledged"]
    prompts = [sys.stdin.read() if p == "-" else p for p in prompts]
    if args.chat_template:
        ids = [tok.apply_chat_template([{"role": "user", "content": p}],
                                       add_generation_prompt=True, tokenize=True)
               for p in prompts]
    else:
        ids = [tok.encode(p) for p in prompts]
    params = sampling(args)
    texts = [""] * len(prompts)
    streaming = not args.no_stream and len(prompts) == 1
    if streaming:
        print(prompts[0], end="", flush=True)
    start, count = time.perf_counter(), 0
    for ev in generate_stream(model, ids, params, tokenizer=tok, compile=args.compile):
        count += 1
        texts[ev.index] += ev.text
        if streaming:
            print(ev.text, end="", flush=True)
    elapsed = time.perf_counter() - start
    if streaming:
        print()
    else:
        for i, (p, t) in enumerate(zip(prompts, texts)):
            print(f"--- [{i}] ---\n{p}{t}")
    print(f"[{count} tokens in {elapsed:.2f}s, {count / elapsed:.1f} tok/s]", file=sys.stderr)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    model, tok = loading.load_model_and_tokenizer(args)
    params = sampling(args)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("minicpm4 chat: /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        limit = model.config.max_position_embeddings
        if len(ids) + params.max_tokens > limit:
            print(f"error: the conversation ({len(ids)} tokens) no longer fits the "
                  f"{limit}-token context; /reset to start over", file=sys.stderr)
            history.pop()
            continue
        print("assistant> ", end="", flush=True)
        reply = ""
        try:
            for ev in generate_stream(model, [ids], params, tokenizer=tok,
                                      compile=args.compile):
                reply += ev.text
                print(ev.text, end="", flush=True)
        except KeyboardInterrupt:
            print(" [interrupted]", end="")
        print()
        history.append({"role": "assistant", "content": reply})


def _cmd_info(args: argparse.Namespace) -> int:
    cfg = loading.resolve_config(model=args.model, preset=args.preset)
    context = None if args.context is None else loading.parse_context(args.context)
    print(loading.describe(loading.apply_context(cfg, context), context=context))
    return 0
