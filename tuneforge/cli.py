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
    if args.adapter:
        from tuneforge.io.peft_format import load_adapter

        model = load_adapter(model, args.adapter, force=args.force)
    generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, seed=args.seed, raw=args.raw, on_text=lambda s: print(s, end="", flush=True))
    print()


def _config(args: argparse.Namespace) -> None:
    from tuneforge import config

    print(config.to_yaml(config.from_yaml(args.config, args.set)), end="")


def _merge(args: argparse.Namespace) -> None:
    from tuneforge.io.export import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype, force=args.force)
    print(f"merged model written to {out}")


def _estimate(args: argparse.Namespace) -> None:
    from tuneforge import config
    from tuneforge.estimate import estimate

    print(estimate(config.from_yaml(args.config, args.set)).describe())


def _train(args: argparse.Namespace) -> None:
    from tuneforge import config
    from tuneforge.train.run import run

    cfg = config.from_yaml(args.config, args.set)
    result = run(cfg, resume=args.resume)
    print(format_summary(result, cfg.train.output_dir))


def format_summary(result: dict, out: str) -> str:
    lines = [f"method {result['method']}: {result['steps']} steps, {result['tokens']:,} tokens in "
             f"{result['seconds']:.0f} s ({result['tokens_per_s']:.0f} tokens/s), peak memory "
             f"{result['peak_memory_mb']:.0f} MB, stopped: {result['stopped']}"]
    for when in ("before", "after"):
        if result.get(when):
            shown = {k: v for k, v in result[when].items() if k in ("loss", "perplexity", "accuracy", "macro_f1")}
            lines.append(f"{when:>6}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    lines.append(f"result in {out}/final (summary.json, metrics.jsonl, loss.png beside it)")
    return "\n".join(lines)


def _eval(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from tuneforge import config
    from tuneforge.eval.run import evaluate_file
    from tuneforge.io.atomic import write_text

    cfg = config.from_yaml(args.config, args.set) if args.config else config.from_dict({}, args.set, source="--set")
    if args.model:
        cfg = dataclasses.replace(cfg, model=args.model)
    metrics = evaluate_file(cfg, args.data, adapter=args.adapter, force=args.force)
    for key in ("loss", "perplexity", "accuracy", "macro_f1"):
        if key in metrics:
            print(f"{key:>10}: {metrics[key]:.4f}")
    print(f"{'n':>10}: {metrics['n']}")
    if "confusion_table" in metrics:
        print(metrics.pop("confusion_table"))
    if args.json:
        write_text(args.json, json.dumps(metrics, indent=1))


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a run configuration (YAML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field with its own type, e.g. --set train.learning_rate=1e-4 (repeatable)")


def _adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="an adapter directory to apply to the model")
    p.add_argument("--force", action="store_true", help="apply an adapter even if it was trained on another base")


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
    _adapter_args(p)
    p.set_defaults(run=_generate)

    p = sub.add_parser("merge", help="fold an adapter into its base and write a standalone model directory")
    _model_args(p)
    p.add_argument("--adapter", required=True, help="the adapter directory")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--force", action="store_true", help="merge even if the adapter was trained on another base")
    p.set_defaults(run=_merge)

    p = sub.add_parser("estimate", help="what a run will cost: parameters, memory, time per step")
    _config_args(p)
    p.set_defaults(run=_estimate)

    p = sub.add_parser("train", help="fine-tune as a run configuration says")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.set_defaults(run=_train)

    p = sub.add_parser("eval", help="loss and perplexity, or accuracy and macro-F1 for classification data")
    p.add_argument("--model", default=None, help="model spec (default: the config's, else smollm2-135m)")
    _adapter_args(p)
    p.add_argument("--data", required=True, help="the evaluation file")
    p.add_argument("--config", default=None, help="a run configuration whose data settings describe the file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set data.format=classification")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")
    p.set_defaults(run=_eval)

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
