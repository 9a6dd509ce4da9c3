"""`python -m minicpm4` / `minicpm4`: thin subcommands over the library's typed functions.

generate  complete prompts (streamed to the terminal; several --prompt make a batch)
chat      interactive ChatML chat with streaming
info      parameter count, memory estimate and config summary
data      prepare training data: `data tokenize` turns text/JSONL corpora into token shards
train     pre-train a model (1 process, or DDP / FSDP2 under torchrun); --resume continues
eval      held-out loss and perplexity of a model folder on a token-shard folder
tune      ModelTunnel: μP coordinate check and LR sweep on proxy widths
serve     OpenAI-compatible HTTP server (continuous batching engine)
bench     `bench serve`: load a running server, audit the streams, print latency
Bad input prints `error: ...` and exits with status 2; no traceback for user mistakes.
"""

from __future__ import annotations

import argparse
import sys

from minicpm4.cli import run, serve, train, tune

_MODULES = (run, train, tune, serve)


def _parser_and_handlers() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(prog="minicpm4", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict = {}
    for module in _MODULES:
        handlers.update(module.register(sub))
    return parser, handlers


def build_parser() -> argparse.ArgumentParser:
    return _parser_and_handlers()[0]


def main(argv: list[str] | None = None) -> int:
    parser, handlers = _parser_and_handlers()
    args = parser.parse_args(argv)
    try:
        return handlers[args.command](args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
