"""`python -m minicpm4` / `minicpm4`: thin subcommands over the library's typed functions.

generate  complete prompts (streamed to the terminal; several --prompt make a batch)
chat      interactive ChatML chat with streaming
info      parameter count, memory estimate and config summary
data      prepare training data: `data tokenize` turns text/JSONL corpora into token shards
train     pre-train a model (1 process, or DDP / FSDP2 under torchrun); --resume continues
eval      held-out loss and perplexity of a model folder on a token-shard folder
tune      ModelTunnel: μP coordinate check and LR sweep on proxy widths
Bad input prints `error: ...` and exits with status 2; no traceback for user mistakes.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from minicpm4 import loading
from minicpm4.data import tokenize as data_tokenize
from minicpm4.engine.generate import generate_stream
from minicpm4.engine.request import SamplingParams


def _add_model_args(p: argparse.ArgumentParser) -> None:
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
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile: about 2x faster batch-1 "
                        "decoding after a one-time compile (15-45 s on a CPU)")


def _add_sampling_args(p: argparse.ArgumentParser, *, temperature: float) -> None:
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


def _sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        stop=tuple(args.stop), seed=args.seed, ignore_eos=args.ignore_eos)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpm4", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="complete one or more prompts",
                         description="Complete prompts; several --prompt run as one batch.")
    _add_model_args(gen)
    gen.add_argument("--prompt", action="append", default=None,
                     help="prompt text (repeatable; '-' reads stdin)")
    gen.add_argument("--chat-template", action="store_true",
                     help="wrap each prompt as a user turn of the chat template")
    gen.add_argument("--no-stream", action="store_true", help="print only the final texts")
    _add_sampling_args(gen, temperature=0.0)

    chat = sub.add_parser("chat", help="interactive chat (ChatML, streaming)",
                          description="Chat in the terminal. /reset clears the history, "
                                      "/exit or Ctrl-D quits.")
    _add_model_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_args(chat, temperature=0.7)

    info = sub.add_parser("info", help="parameter count, memory estimate, config summary",
                          description="Summarise a model folder, a config.json or a preset.")
    info.add_argument("--model", metavar="PATH", default=None,
                      help="model folder or config.json (default: the bundled model)")
    info.add_argument("--preset", choices=sorted(loading.PRESETS), default=None)
    info.add_argument("--context", type=int, default=None,
                      help="context length for the KV-cache estimate (default: max positions)")
    _add_data_parser(sub)
    _add_train_parsers(sub)
    _add_tune_parser(sub)
    return parser


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="prepare training data (tokenize corpora into shards)",
                          description="Prepare training data.")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    tok = dsub.add_parser(
        "tokenize", help="text / JSONL corpora -> memory-mapped uint32 token shards",
        description="Tokenize corpora into OUT/train (and OUT/eval for --holdout files): "
                    "shard-NNNNN.bin (uint32 ids, each document <s> ... </s>), shard-NNNNN.idx "
                    "(uint64 document offsets) and index.json. A .txt file is one document, a "
                    ".jsonl file one document per line. Re-running writes the same bytes.")
    tok.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="a .txt / .jsonl file, a directory (searched recursively) or a glob")
    tok.add_argument("--out", required=True, metavar="DIR", help="output folder")
    tok.add_argument("--holdout", action="append", default=[], metavar="NAME",
                     help="input file (name, stem or path) for the eval folder (repeatable)")
    tok.add_argument("--tokenizer", metavar="DIR", default=None,
                     help="tokenizer folder (default: the bundled MiniCPM4 tokenizer)")
    tok.add_argument("--max-shard-tokens", type=int, default=data_tokenize.DEFAULT_MAX_SHARD_TOKENS,
                     metavar="N", help="start a new shard before exceeding N tokens "
                                       f"(default {data_tokenize.DEFAULT_MAX_SHARD_TOKENS:,})")
    tok.add_argument("--text-key", default="text", metavar="K",
                     help="JSONL field holding the text (default: text)")


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
    params = _sampling(args)
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
    params = _sampling(args)
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
    print(loading.describe(cfg, context=args.context))
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    folders = data_tokenize.tokenize_corpus(
        args.inputs, args.out, holdout=args.holdout, tokenizer=args.tokenizer,
        max_shard_tokens=args.max_shard_tokens, text_key=args.text_key,
        progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"[tokenized in {time.perf_counter() - start:.1f}s]", file=sys.stderr)
    for split, folder in folders.items():
        print(f"{split}: {folder}")
    return 0


def _add_train_parsers(sub: argparse._SubParsersAction) -> None:
    tr = sub.add_parser(
        "train", help="pre-train a model on token shards (CPU, torchrun, GPUs)",
        description="Pre-train on a `data tokenize` folder. The same command runs in one process "
                    "or under `torchrun --nproc_per_node N -m minicpm4 train ...` (gloo on CPU, "
                    "nccl on GPU). RUN_DIR gets config.json, metrics.jsonl and checkpoints/.")
    g = tr.add_argument_group("model (one of)")
    g.add_argument("--preset", choices=sorted(loading.PRESETS), default=None)
    g.add_argument("--model-config", metavar="PATH", default=None,
                   help="HF config.json (or a folder holding one): fresh init of that shape")
    g.add_argument("--init-from", metavar="DIR", default=None,
                   help="HF model folder whose weights start the run")
    g.add_argument("--parametrization", choices=["mup", "sp"], default="mup")
    g.add_argument("--mtp-lambda", type=float, default=0.0,
                   help="MTP loss weight (needs a model config with num_mtp_layers 1)")
    d = tr.add_argument_group("data and batch")
    d.add_argument("--data", required=True, metavar="DIR", help="training shard folder")
    d.add_argument("--eval-data", metavar="DIR", default=None, help="held-out shard folder")
    d.add_argument("--run-dir", required=True, metavar="DIR")
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--batch-size", type=int, default=8, help="rows per micro-batch per rank")
    d.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step per rank")
    o = tr.add_argument_group("optimisation (AdamW + WSD)")
    o.add_argument("--steps", type=int, required=True, help="optimizer steps in the run")
    o.add_argument("--lr", type=float, default=1e-2)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--grad-clip", type=float, default=1.0, help="0 disables clipping")
    o.add_argument("--warmup-steps", type=int, default=None, help="default: steps // 20")
    o.add_argument("--decay-fraction", type=float, default=0.1)
    o.add_argument("--decay-type", choices=["exponential", "linear", "cosine"],
                   default="exponential")
    o.add_argument("--min-lr-ratio", type=float, default=0.1)
    r = tr.add_argument_group("run")
    r.add_argument("--eval-interval", type=int, default=0, help="0: only after the last step")
    r.add_argument("--eval-batches", type=int, default=8)
    r.add_argument("--checkpoint-interval", type=int, default=0,
                   help="0: only after the last step")
    r.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    r.add_argument("--log-interval", type=int, default=1)
    r.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16 = autocast over fp32 weights")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    r.add_argument("--distributed", choices=["auto", "none", "ddp", "fsdp"], default="auto",
                   help="auto: DDP under torchrun, none otherwise")
    r.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --run-dir")
    r.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="leave after N steps of this invocation (time-limited jobs; continue "
                        "later with --resume from the newest checkpoint)")
    ev = sub.add_parser("eval", help="held-out loss and perplexity of a model folder",
                        description="Mean next-token loss and perplexity of a model folder (or "
                                    "a training checkpoint) over a token-shard folder.")
    ev.add_argument("--model", required=True, metavar="DIR")
    ev.add_argument("--data", required=True, metavar="DIR", help="shard folder (e.g. OUT/eval)")
    ev.add_argument("--seq-len", type=int, default=256)
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--batches", type=int, default=None, help="default: every window")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")


def _cmd_train(args: argparse.Namespace) -> int:
    from minicpm4.model.hf import load_config
    from minicpm4.train.config import OptimConfig, ScheduleConfig
    from minicpm4.train.loop import train
    from minicpm4.train.recipe import TrainConfig
    from minicpm4.utils import dist

    sources = [x for x in (args.preset, args.model_config, args.init_from) if x]
    if len(sources) != 1:
        raise ValueError("give exactly one of --preset, --model-config, --init-from")
    if args.preset:
        model_cfg = loading.PRESETS[args.preset]()
    else:
        model_cfg = load_config(args.model_config or args.init_from)
    if not isinstance(args.steps, int) or args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    warmup = args.steps // 20 if args.warmup_steps is None else args.warmup_steps
    cfg = TrainConfig(
        model=model_cfg, init_from=args.init_from, data=args.data, eval_data=args.eval_data,
        run_dir=args.run_dir, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        optim=OptimConfig(lr=args.lr, weight_decay=args.weight_decay,
                          grad_clip=args.grad_clip or None, parametrization=args.parametrization),
        schedule=ScheduleConfig(warmup_steps=warmup, total_steps=args.steps,
                                decay_fraction=args.decay_fraction, decay_type=args.decay_type,
                                min_lr_ratio=args.min_lr_ratio),
        eval_interval=args.eval_interval, eval_batches=args.eval_batches,
        checkpoint_interval=args.checkpoint_interval, keep_checkpoints=args.keep,
        log_interval=args.log_interval, dtype=args.dtype, seed=args.seed, device=args.device,
        distributed=args.distributed, mtp_lambda=args.mtp_lambda)
    try:
        if args.stop_after is not None and args.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
        result = train(cfg, resume=args.resume, stop_after=args.stop_after)
        # DDP / FSDP wrappers sit in reference cycles: collect them now, while the process
        # group is alive, not at interpreter exit (gloo aborts with "terminate called ...")
        gc.collect()
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy()
    if result.checkpoint is not None:
        print(f"final checkpoint: {result.checkpoint}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from minicpm4.train.loop import evaluate_folder
    out = evaluate_folder(args.model, args.data, seq_len=args.seq_len,
                          batch_size=args.batch_size, batches=args.batches,
                          device=args.device, dtype=args.dtype)
    print(f"loss {out['loss']:.4f}  perplexity {out['perplexity']:.3f}  "
          f"({out['num_targets']:,} targets in {out['num_batches']} batches)")
    return 0


def _add_tune_parser(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser("tune", help="ModelTunnel: μP coordinate check and LR sweep",
                          description="μP checks and hyper-parameter search on small proxies "
                                      "(anchors Part B §1.4-1.6, spec §5.2). Results (JSON, "
                                      "PNG plot, markdown table) go to --out.")
    tsub = tune.add_subparsers(dest="tune_command", required=True, metavar="SUBCOMMAND")
    cc = tsub.add_parser("coord-check", help="mean |activation| vs width, μP and SP")
    cc.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    cc.add_argument("--steps", type=int, default=4)
    cc.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    cc.add_argument("--lr", type=float, default=1e-2)
    cc.add_argument("--text", metavar="FILE", default=None,
                    help="byte-level batch from this text file (default: random ids)")
    ls = tsub.add_parser("lr-sweep", help="log2 LR grid x widths, μP and SP, WSD runs")
    ls.add_argument("--data", required=True, metavar="PATH",
                    help="text files / folder (tokenized into --out) or a `data tokenize` "
                         "output with train/ and eval/")
    ls.add_argument("--holdout", action="append", default=[], metavar="NAME",
                    help="input file held out for the indicator (for text input)")
    ls.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    ls.add_argument("--lrs", type=float, nargs="+", default=None,
                    help="learning rates (default 2^-12 ... 2^-5)")
    ls.add_argument("--init-stds", type=float, nargs="+", default=[0.02])
    ls.add_argument("--steps", type=int, default=80)
    ls.add_argument("--batch-size", type=int, default=8)
    ls.add_argument("--seq-len", type=int, default=64)
    ls.add_argument("--dim-model-base", type=int, default=None,
                    help="μP base width (default: the smallest of --widths)")
    ls.add_argument("--vocab-size", type=int, default=4096,
                    help="compact vocab: the V-1 most frequent training ids + 'other'")
    for p in (cc, ls):
        p.add_argument("--parametrizations", nargs="+", choices=["mup", "sp"],
                       default=["mup", "sp"])
        p.add_argument("--out", required=True, metavar="DIR")
        p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def _cmd_tune(args: argparse.Namespace) -> int:
    import shlex

    import torch

    from minicpm4.train import coord_check, mup_search
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    command = "minicpm4 " + shlex.join(sys.argv[1:])
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.tune_command == "coord-check":
        batch = coord_check.text_batch(args.text) if args.text else None
        res = coord_check.coord_check(args.widths, parametrizations=args.parametrizations,
                                      steps=args.steps, seeds=args.seeds, lr=args.lr,
                                      batch_BT1=batch, progress=say)
        paths = coord_check.write_report(
            args.out, "coord_check", res, "μP coordinate check", command,
            [("mean |x| per module and width", coord_check.coord_table(res))],
            coord_check.plot_coord_check)
        for p, ratios in res["ratios"].items():
            print(f"{p}: max/min across widths at t={res['steps']}: "
                  + ", ".join(f"{m} {r:.2f}" for m, r in ratios.items()))
    else:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="minicpm4-tune-") as work:
            corpus = mup_search.prepare_corpus(args.data, work, holdout=args.holdout,
                                               vocab_size=args.vocab_size, progress=say)
        lrs = args.lrs or [2.0 ** k for k in range(-12, -4)]
        settings = mup_search.SweepSettings(steps=args.steps, batch=args.batch_size,
                                            seq_len=args.seq_len,
                                            dim_model_base=args.dim_model_base)
        res = mup_search.lr_sweep(corpus, args.widths, lrs,
                                  parametrizations=args.parametrizations,
                                  init_stds=args.init_stds, settings=settings, progress=say)
        paths = coord_check.write_report(
            args.out, "lr_sweep", res, "μP / SP learning-rate sweep (ModelTunnel)", command,
            [("conditional loss of held-out continuations (indicator)",
              mup_search.sweep_table(res, "cond_loss")),
             ("plain LM loss, same passages", mup_search.sweep_table(res, "lm_loss"))],
            mup_search.plot_sweep)
        if res["chosen"]:  # the μP argmin; absent for an SP-only sweep
            chosen = Path(args.out) / "chosen.json"
            chosen.write_text(json.dumps(res["chosen"], indent=1), encoding="utf-8")
            paths.append(chosen)
        for p, per_width in res["best"].items():
            print(f"{p}: best log2 LR per width (indicator): "
                  + ", ".join(f"d={w} {b['log2_lr']:g} ({b['cond_loss']:.4f})"
                              for w, b in per_width.items()))
        print(f"chosen: {json.dumps(res['chosen'])}")
    for path in paths:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"generate": _cmd_generate, "chat": _cmd_chat, "info": _cmd_info,
               "data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval,
               "tune": _cmd_tune}[args.command]
    try:
        return handler(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())

