"""`minicpm4 tune coord-check | lr-sweep`: ModelTunnel on small μP proxies (spec §5.2;
anchors Part B §1.4-1.6)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

Handler = Callable[[argparse.Namespace], int]


def register(sub: argparse._SubParsersAction) -> dict[str, Handler]:
    """Add tune to `sub`; returns its handler."""
    _add_tune_parser(sub)
    return {"tune": _cmd_tune}


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
