"""`minicpm4 data tokenize | train | eval | export`: the training pipeline's commands
(architecture §3 "cli"; spec §5; issue 3)."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Callable

from minicpm4 import loading
from minicpm4.cli.run import add_context_sparse_args
from minicpm4.data import tokenize as data_tokenize

Handler = Callable[[argparse.Namespace], int]


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add data / train / eval / export to `sub`; returns their handlers by name."""
    _add_data_parser(sub)
    _add_train_parsers(sub)
    ex = sub.add_parser(
        "export", help="a training checkpoint or model folder -> a standalone HF folder",
        description="Write the model of a training checkpoint (or any model folder) as an HF "
                    "folder (config.json + model.safetensors, HF tensor names, MTP head "
                    "included) in the chosen dtype, e.g. bf16 for shipping.")
    ex.add_argument("source", metavar="CHECKPOINT_OR_MODEL_DIR")
    ex.add_argument("out", metavar="OUT_DIR")
    ex.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    ex.add_argument("--tokenizer", metavar="DIR", nargs="?", const="bundled", default=None,
                    help="also copy a tokenizer folder into OUT_DIR (no value: the bundled "
                         "MiniCPM4 tokenizer)")
    rep = sub.add_parser("report", help="summary and loss curve of a training run",
                         description="Print a JSON summary of a `minicpm4 train` run folder "
                                     "(steps, tokens, tokens/s, losses, evals) and write its "
                                     "loss curve as a PNG.")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    rep.add_argument("--plot", metavar="PNG", default=None,
                     help="where to write the curve (default RUN_DIR/loss_curve.png)")
    rep.add_argument("--title", default=None)
    return {"data": _cmd_data, "train": _cmd_train, "eval": _cmd_eval, "export": _cmd_export,
            "report": _cmd_report}


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
    lc = dsub.add_parser(
        "long-context", help="tokenized books -> exact-length chunks with planted pass keys",
        description="Cut the documents of a `data tokenize` folder into documents of exactly "
                    "--seq-len tokens (one per training row, as InfLLM v2 sparse training "
                    "needs); a --passkey-fraction of them carry a planted 5-digit pass key and "
                    "the question at the end (minicpm4/data/long_context.py).")
    lc.add_argument("source", metavar="TOKENIZED_DIR")
    lc.add_argument("--out", required=True, metavar="DIR")
    lc.add_argument("--seq-len", type=int, required=True)
    lc.add_argument("--passkey-fraction", type=float, default=0.5)
    lc.add_argument("--seed", type=int, default=0)
    lc.add_argument("--tokenizer", metavar="DIR", default=None)


def _cmd_data(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.data_command == "long-context":
        from minicpm4.data.long_context import build_long_context_folder
        out = build_long_context_folder(
            args.source, args.out, seq_len=args.seq_len, passkey_fraction=args.passkey_fraction,
            seed=args.seed, tokenizer=args.tokenizer,
            progress=lambda line: print(line, file=sys.stderr, flush=True))
        print(f"train: {out}")
        return 0
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
                   help="HF model folder whose weights start the run (continued training; "
                        "with --context / --sparse the run's config extends the folder's)")
    g.add_argument("--parametrization", choices=["mup", "sp"], default="mup")
    g.add_argument("--mtp-lambda", type=float, default=0.0,
                   help="MTP loss weight (needs a model config with num_mtp_layers 1)")
    add_context_sparse_args(tr, lse=False)
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
    add_context_sparse_args(ev, lse=False)


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
    model_cfg = loading.apply_sparse_args(loading.apply_context(model_cfg, args.context), args)
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
        worker = dist.is_distributed()
        dist.barrier()  # no rank tears gloo down while another still talks to it
    finally:
        dist.destroy()
    if result.checkpoint is not None:
        print(f"final checkpoint: {result.checkpoint}")
    if worker:
        # A torchrun worker whose work is done and saved (files closed, checkpoints fsynced)
        # leaves without interpreter teardown: gloo's C++ threads have aborted a rank there
        # once in CI, turning a finished run into a failed job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from minicpm4.train.loop import evaluate_folder
    if args.context is not None:
        loading.parse_context(args.context)  # a bad value fails before any loading
    out = evaluate_folder(args.model, args.data, seq_len=args.seq_len,
                          batch_size=args.batch_size, batches=args.batches,
                          device=args.device, dtype=args.dtype,
                          adjust_config=lambda cfg: loading.apply_sparse_args(
                              loading.apply_context(cfg, args.context), args))
    print(f"loss {out['loss']:.4f}  perplexity {out['perplexity']:.3f}  "
          f"({out['num_targets']:,} targets in {out['num_batches']} batches)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import shutil
    from pathlib import Path

    from minicpm4.model.transformer import MiniCPM4ForCausalLM
    from minicpm4.train.checkpoint import model_folder

    source = model_folder(args.source)
    model = MiniCPM4ForCausalLM.from_pretrained(source)
    out = Path(args.out)
    model.save_pretrained(out, dtype=args.dtype)
    if args.tokenizer:
        tok_dir = loading.BUNDLED_TOKENIZER if args.tokenizer == "bundled" else Path(args.tokenizer)
        if not (tok_dir / "tokenizer.json").is_file() and \
                not (tok_dir / "tokenizer.model").is_file():
            raise ValueError(f"{tok_dir} holds no tokenizer.json / tokenizer.model")
        for f in tok_dir.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy2(f, out / f.name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({args.dtype}, {model.config.num_parameters() / 1e6:.1f}M parameters, "
          f"{size / 2**20:.1f} MiB of weights)")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from minicpm4.train import report

    summary = report.summarize(args.run_dir)
    summary.pop("config", None)
    path = report.plot_run(args.run_dir, args.plot or Path(args.run_dir) / "loss_curve.png",
                           title=args.title)
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0
