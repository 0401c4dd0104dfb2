"""The ``sluice`` command line."""

from __future__ import annotations

import argparse
import sys

from sluice.runtime.generate import greedy_generate
from sluice.runtime.loader import load_model


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny",
                   help="built-in model name (tiny, smollm2-135m-random) or a Hugging Face "
                        "checkpoint directory (default: tiny)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="weight and activation dtype (default: float32 on CPU, bfloat16 "
                        "on GPU/TPU)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights of built-in models (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice LLM serving runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate a greedy continuation of a prompt")
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="prompt text")
    gen.add_argument("--max-tokens", type=int, default=32,
                     help="maximum number of tokens to generate (default: 32)")
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    model = load_model(args.model, dtype=args.dtype, seed=args.seed)
    ids = model.tokenizer.encode(args.prompt)
    out = greedy_generate(model, ids, args.max_tokens)
    print(args.prompt + model.tokenizer.decode(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate}[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sluice: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
