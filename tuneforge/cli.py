"""The `tuneforge` command: each subcommand parses its arguments, then makes one library call.

A UserError prints as one line on stderr and exits with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from tuneforge.errors import UserError


def _generate(args: argparse.Namespace) -> None:
    from tuneforge.eval.generate import generate
    from tuneforge.io.load import load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
    generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, seed=args.seed, raw=args.raw, on_text=lambda s: print(s, end="", flush=True))
    print()


def _config(args: argparse.Namespace) -> None:
    from tuneforge import config

    print(config.to_yaml(config.from_yaml(args.config, args.set)), end="")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a run configuration (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field with its own type, e.g. --set train.learning_rate=1e-4 (repeatable)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="a named model (smollm2-135m), a Hugging Face model directory, or a .gguf file")
    p.add_argument("--dtype", default="auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune pretrained language models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate a reply to a prompt, streamed to the terminal")
    _model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt (sent through the chat template unless --raw)")
    p.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (the default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature above 0")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.set_defaults(run=_generate)

    p = sub.add_parser("config", help="check a run configuration and print it with every default filled in")
    _config_args(p)
    p.set_defaults(run=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"tuneforge: error: {exc.line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tuneforge: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
