"""The `tuneforge` command: each subcommand parses its arguments, then makes one library call.

A UserError prints as one line on stderr and exits with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path

from tuneforge import __version__
from tuneforge.core import config
from tuneforge.core.atomic import write_text
from tuneforge.core.errors import TuneforgeWarning, UserError
from tuneforge.core.host import keep_freed_memory
from tuneforge.training.interrupts import Interrupted


def _generate(args: argparse.Namespace) -> None:
    from tuneforge.eval.generate import generate
    from tuneforge.io.load import load_model
    from tuneforge.methods._shared import Injected

    if args.temperature == 0 and args.top_p < 1:  # else silently greedy
        raise UserError(f"top-p {args.top_p:g} is for sampling, and temperature 0 decodes greedily", "--top-p",
                        fix="give --temperature above 0 (such as 0.7) to sample")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle)
    if args.adapter:
        from tuneforge.io.peft_format import load_adapter

        if not isinstance(load_adapter(model, args.adapter, force=args.force), Injected):
            raise UserError("this folder holds a feature classifier, which labels texts and does not generate",
                            args.adapter, fix="score texts with it: tuneforge eval --adapter")
    generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, seed=args.seed, raw=args.raw, system=args.system,
             on_text=lambda s: print(s, end="", flush=True))
    print()


def _config(args: argparse.Namespace) -> None:
    cfg = config.from_yaml(args.config, args.set)
    if cfg.compare.methods:  # a comparison's rows are checked too, and shown as they will run
        from tuneforge.apps.compare import as_compared, row_places

        print(as_compared(cfg, row_places(args.config, args.set)), end="")
    else:
        print(config.to_yaml(cfg), end="")


def _data(args: argparse.Namespace) -> None:
    from tuneforge.data import load_datasets
    from tuneforge.data.show import describe
    from tuneforge.io.load import load_tokenizer

    cfg = config.from_yaml(args.config, args.set)
    tokenizer = load_tokenizer(cfg.model)
    data = load_datasets(cfg.data, tokenizer, seed=cfg.train.seed)
    if cfg.data.format == "preference":  # the rows as train.objective takes them, refused as a run refuses them
        from tuneforge.training import objectives

        objectives.data(cfg.train, data)
    print(describe(data, tokenizer, count=args.examples, split=args.split, color=sys.stdout.isatty()), end="")
    if cfg.data.packing:  # the rows training will make of these examples
        from tuneforge.training.run import packing_line, packing_report

        print(packing_line(cfg, packing_report(cfg, data)))


def _merge(args: argparse.Namespace) -> None:
    from tuneforge.io.export import merge_adapter

    out = merge_adapter(args.model, args.adapter, args.out, dtype=args.dtype, force=args.force,
                        allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    print(f"merged model written to {out}")


def _export(args: argparse.Namespace) -> None:
    from tuneforge.io.export import export

    for path in export(args.model, args.out, args.format, adapter_dir=args.adapter, dtype=args.dtype,
                       ollama_file=args.ollama, overwrite=args.overwrite, force=args.force,
                       allow_pickle=args.allow_pickle):
        print(f"written: {path}")


def _estimate(args: argparse.Namespace) -> None:
    from tuneforge.training.run import estimate_run, shortfall

    est = estimate_run(config.from_yaml(args.config, args.set))
    print(est.describe())
    if short := shortfall(est):
        print(f"it does not fit: {short[0]}; to fit, {short[1]}. `tuneforge train` refuses it unless --force.")
    if args.json:
        write_text(args.json, json.dumps(est.as_dict(), indent=1))


def _train(args: argparse.Namespace) -> None:
    cfg = config.from_yaml(args.config, args.set)
    if args.nproc > 1:
        if "WORLD_SIZE" in os.environ:
            raise UserError("--nproc starts torchrun, and this process already runs under it", "--nproc",
                            fix="leave --nproc out of a command that torchrun starts")
        sys.exit(_launch(args.nproc, args.argv))
    from tuneforge.training.run import run

    result = run(cfg, resume=args.resume, overwrite=args.overwrite, force=args.force)
    if int(os.environ.get("RANK", "0")) == 0:
        print(format_summary(result, str(Path(cfg.train.output_dir).expanduser())))


def _launch(nproc: int, argv: list[str]) -> int:
    """``tuneforge train ... --nproc N``: the same command under torchrun (its own launcher, called
    here), N processes on this machine. Returns the exit code of the first process that failed.
    Ctrl-C and SIGTERM reach every process, which stop at the end of a step and save."""
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run as torchrun

    rest, skip = [], False
    for arg in argv:  # the command without --nproc
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        rest.append(arg)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)  # its notes on stopping the others
    # Each process computes on its share of the cores (torchrun's default is one thread each)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        torchrun(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "tuneforge",
                                                *rest]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        caught = {128 + s.value: s.name for s in (signal.SIGINT, signal.SIGTERM)}  # it saved and left on a signal
        signalled = failure.exitcode < 0 or failure.exitcode in caught
        how = (f"signal {failure.signal_name() if failure.exitcode < 0 else caught[failure.exitcode]}"
               if signalled else f"exit code {failure.exitcode}")
        print(f"tuneforge: error: process {rank} of {nproc} ended with {how}, and the others were stopped"
              + ("" if signalled else "; its error is above"), file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as exc:  # the processes had the signal too, saved and stopped
        return 128 + int(exc.sigval)
    return 0


def format_summary(result: dict, out: str) -> str:
    """The run's summary in a few lines; methods report what applies to them."""
    lines = [f"method {result['method']}: {result['trainable_parameters']:,} trainable parameters"]
    if result.get("total_parameters"):
        lines[0] += f" ({100 * result['trainable_parameters'] / result['total_parameters']:.2f}% of " \
                    f"{result['total_parameters']:,})"
    if "artifact_bytes" in result:
        lines[0] += f"; result {result['artifact_bytes'] / 2**20:.1f} MiB on disk"
    if "steps" in result:
        lines.append(f"{result['steps']} steps, {result['tokens']:,} tokens in {result['seconds']:.0f} s "
                     f"({result['tokens_per_s']:.0f} tokens/s), peak memory {result['peak_memory_mb']:.0f} MB, "
                     f"stopped: {result['stopped']}")
    if "fit" in result:
        fit = result["fit"]
        chosen = ", ".join(f"{k} {v}" for k, v in fit.items() if isinstance(v, (int, str)) and not isinstance(v, bool))
        lines.append(f"fitted in {result['seconds']:.1f} s ({fit['seconds_extract']:.1f} s extracting features"
                     f"{', from the cache' if fit['cache_hit'] else ''}){'; ' + chosen if chosen else ''}")
    for when in ("before", "after"):
        metrics = result.get(when) or {}
        shown = {k: v for k, v in metrics.items() if k in ("loss", "perplexity", "accuracy", "macro_f1",
                                                           "rewards_accuracy", "rewards_margin")}
        if shown:
            lines.append(f"{when:>6}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()) + _interval(metrics)
                         + (f"; {metrics['examples_per_second']:.1f} examples/s" if "examples_per_second" in metrics
                            else ""))
    lines.append(f"result in {out}/final (summary.json beside it)")
    return "\n".join(lines)


def _span(interval: list[float]) -> str:
    return f"{interval[0]:.4f} to {interval[1]:.4f}"


def _interval(metrics: dict) -> str:
    """The accuracy's 95% interval and sample size, where there is one: how much the figure can say."""
    if "accuracy_ci95" not in metrics:
        return ""
    return f" (accuracy's 95% interval {_span(metrics['accuracy_ci95'])} on {metrics['n']})"


def _eval(args: argparse.Namespace) -> None:
    from tuneforge.eval.run import evaluate_file, run_config

    _check_json(args)
    # A run's result is scored as the run read its data: its own config.yaml, unless --config says otherwise
    found = None if args.config else run_config(args.adapter or args.model)
    if found:
        print(f"tuneforge: the data is read as the run's {found} says (--config gives another)", file=sys.stderr)
    cfg = _file_config(args, {}, found)
    if args.device:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device=args.device))
    metrics = evaluate_file(cfg, args.data, adapter=args.adapter, force=args.force, held_out=args.held_out,
                            unseen=args.unseen)
    for key in ("loss", "perplexity", "accuracy", "macro_f1"):
        if key in metrics:
            ci = metrics.get("accuracy_ci95") if key == "accuracy" else None
            print(f"{key:>10}: {metrics[key]:.4f}" + (f" (95% interval {_span(ci)})" if ci else ""))
    print(f"{'n':>10}: {metrics['n']}")
    for name, part in metrics.get("parts", {}).items():
        print(f"{name:>16}: accuracy {part['accuracy']:.4f}, macro-F1 {part['macro_f1']:.4f}, n {part['n']}")
    if "confusion_table" in metrics:
        print(metrics.pop("confusion_table"))
    _write_json(args, metrics)


def _icl(args: argparse.Namespace) -> None:
    from tuneforge.eval.fewshot import evaluate_icl

    _check_json(args)
    cfg = _file_config(args, {"data": {"format": "classification"}})
    # Demonstrations come from --train; without it, from the part of --data not held out.
    data = dataclasses.replace(cfg.data, path=args.train or args.data, eval_path=args.data if args.train else None)
    cfg = dataclasses.replace(cfg, data=data)
    metrics = evaluate_icl(cfg, k=args.shots, mode=args.mode, strategy=args.strategy, calibrate=args.calibrate,
                           seed=args.seed)
    for key, value in metrics.items():
        if key == "accuracy_ci95":
            value = _span(value)
        print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    _write_json(args, metrics)


def _file_config(args: argparse.Namespace, defaults: dict, run_config: Path | None = None):
    """eval and icl: the run config that describes the data file (--config, else the run's own
    ``run_config``, else ``defaults``), with --set applied and --model winning over the config's model."""
    source = args.config or run_config
    cfg = config.from_yaml(source, args.set) if source else config.from_dict(defaults, args.set, source="--set")
    cfg = dataclasses.replace(cfg, model=args.model) if args.model else cfg
    return dataclasses.replace(cfg, allow_pickle=True) if args.allow_pickle else cfg


def _file_args(p: argparse.ArgumentParser, example: str, run_default: str = "") -> None:
    p.add_argument("--model", default=None, help="model spec (default: the config's, else smollm2-135m)")
    p.add_argument("--config", default=None,
                   help=f"a run configuration whose data settings describe the file{run_default}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a field, e.g. --set {example}")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")
    _pickle_arg(p)


def _check_json(args: argparse.Namespace) -> None:
    """Refuse, before any model loads, a --json that cannot be written: a folder, or under a file."""
    from tuneforge.core.atomic import file_on_the_way

    if not args.json:
        return
    path = Path(args.json).expanduser()
    if path.is_dir():
        raise UserError("--json names a folder", str(path), fix=f"give a file name, such as {path / 'metrics.json'}")
    if blocker := file_on_the_way(path):
        raise UserError(f"{blocker} is a file, so no folder can be made under it", f"--json {args.json}",
                        fix="give a --json path whose parent folders are folders")


def _write_json(args: argparse.Namespace, metrics: dict) -> None:
    if args.json:
        write_text(args.json, json.dumps(metrics, indent=1))


def _compare(args: argparse.Namespace) -> None:
    from tuneforge.apps.compare import RowsFailed, compare, row_places

    cfg = config.from_yaml(args.config, args.set)
    results = compare(cfg, places=row_places(args.config, args.set))
    table = Path(cfg.compare.output_dir) / "compare.md"
    print(table.read_text(), end="")
    print(f"table, chart and one folder per row in {cfg.compare.output_dir}")
    if failed := [r for r in results if r.get("error")]:
        raise RowsFailed(f"{len(failed)} of {len(results)} rows failed: "
                         + "; ".join(f"{r['label']!r} ({r['error'].splitlines()[0]})" for r in failed), str(table),
                         fix="each failed row's error is in the table's error column")


def _ui(args: argparse.Namespace) -> None:
    from tuneforge.apps.ui import serve

    serve(args.runs, args.data, host=args.host, port=args.port)


def _config_args(p: argparse.ArgumentParser, what: str = "a run configuration",
                 example: str = "configs/sentiment-lora.yaml") -> None:
    p.add_argument("config", metavar="CONFIG.yaml", help=f"{what} (YAML), such as {example}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field with its own type, e.g. --set train.learning_rate=1e-4 (repeatable)")


def _adapter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="an adapter directory to apply to the model")
    p.add_argument("--force", action="store_true", help="apply an adapter even if it was trained on another base")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="a named model (smollm2-135m), a Hugging Face model directory, or a .gguf file")
    p.add_argument("--dtype", default="auto", type=_torch_dtype,
                   help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16, float16 (or f32, bf16, f16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    _pickle_arg(p)


def _torch_dtype(name: str) -> str:
    """--dtype in either spelling: torch's (float32), or GGUF's (f32) as export takes it."""
    return {"f32": "float32", "f16": "float16"}.get(name, name)


def _int_from(least: int):
    """An argparse type: an integer of at least ``least``."""
    def parse(text: str) -> int:
        value = int(text)  # a ValueError is argparse's "invalid int value"
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: it must be {least} or more")
        return value
    parse.__name__ = "int"
    return parse


def _float_in(low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: a number from ``low`` (excluded when ``low_open``) to ``high``."""
    bounds = (f"{'above' if low_open else 'at least'} {low:g}" if high == math.inf
              else f"in {'(' if low_open else '['}{low:g}, {high:g}]")

    def parse(text: str) -> float:
        value = float(text)
        if not ((low < value) if low_open else (low <= value)) or not value <= high:  # NaN fails both
            raise argparse.ArgumentTypeError(f"{text}: it must be {bounds}")
        return value
    parse.__name__ = "float"
    return parse


def _pickle_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-pickle", action="store_true",
                   help="read a model folder whose weights are only pickled (pytorch_model.bin) with torch's "
                        "weights-only loader; without it such a folder is refused")


_OVERWRITE = "replace an output that exists, moving it aside to OUT.previous-<time> first (nothing is deleted)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description="Fine-tune pretrained language models.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser.add_argument("--version", action="version", version=f"tuneforge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="generate a reply to a prompt, streamed to the terminal")
    _model_args(p)
    p.add_argument("--prompt", required=True, help="the prompt (sent through the chat template unless --raw)")
    p.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    p.add_argument("--system", default=None,
                   help="the system message (default: the template's); classification adapters were trained "
                        "with the question here and 'Text: ...' as the prompt")
    p.add_argument("--max-new-tokens", type=_int_from(1), default=256, metavar="N",
                   help="stop after N new tokens, or earlier at the end token (default 256)")
    p.add_argument("--temperature", type=_float_in(0), default=0.0,
                   help="0 decodes greedily (the default)")
    p.add_argument("--top-p", type=_float_in(0, 1, low_open=True), default=1.0,
                   help="nucleus sampling, with --temperature above 0")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    _adapter_args(p)
    p.set_defaults(run=_generate)

    p = sub.add_parser("merge", help="fold an adapter into its base and write a standalone model directory "
                                     "(export --format hf)")
    p.add_argument("--model", default=None,
                   help="the base: a named model, a Hugging Face model directory, or a .gguf file (default: the "
                        "one the adapter records it was trained on)")
    p.add_argument("--adapter", required=True, help="the adapter directory")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--dtype", default="float32",
                   help="the merged weights: float32 (the default; auto is the same: the merge computes in float32 "
                        "on the CPU), bfloat16 or float16 (or f32, bf16, f16)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    p.add_argument("--force", action="store_true", help="merge even if the adapter was trained on another base")
    _pickle_arg(p)
    p.set_defaults(run=_merge)

    p = sub.add_parser("export", help="write a model (its adapter merged) or a LoRA adapter for llama.cpp, "
                                      "Ollama or Hugging Face")
    p.add_argument("--model", default=None,
                   help="the base: a named model, a Hugging Face model directory, or a .gguf file (default: the one "
                        "the adapter records it was trained on; without --adapter, smollm2-135m)")
    p.add_argument("--adapter", default=None, help="an adapter directory to apply (merged, or as a LoRA file)")
    p.add_argument("--format", default="gguf", choices=["gguf", "gguf-lora", "hf"],
                   help="gguf: one file for llama.cpp, the adapter merged; gguf-lora: the LoRA adapter alone as a "
                        "GGUF adapter file; hf: a Hugging Face model directory (what `merge` writes)")
    p.add_argument("--out", required=True, help="the file (gguf, gguf-lora) or folder (hf) to write")
    p.add_argument("--dtype", default="f32",
                   help="f32 (default), f16, bf16 (or float32, float16, bfloat16); GGUF also q8_0, q5_1, q5_0, q4_1, "
                        "q4_0")
    p.add_argument("--ollama", action="store_true",
                   help="also write an Ollama Modelfile beside the GGUF (ollama create NAME -f Modelfile)")
    p.add_argument("--overwrite", action="store_true", help=_OVERWRITE)
    p.add_argument("--force", action="store_true", help="apply the adapter even if it was trained on another base")
    _pickle_arg(p)
    p.set_defaults(run=_export)

    p = sub.add_parser("estimate", help="what a run will cost: parameters, memory, time per step")
    _config_args(p)
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the estimate as JSON: peak_memory_bytes, step_seconds, run_seconds, parts")
    p.set_defaults(run=_estimate)

    p = sub.add_parser("train", help="fine-tune as a run configuration says")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in an output folder that holds files, moving them aside to "
                        "OUTPUT_DIR.previous-<time> (nothing is deleted)")
    p.add_argument("--force", action="store_true",
                   help="train even if the estimated peak memory exceeds what the machine has available")
    p.add_argument("--nproc", type=_int_from(1), default=1, metavar="N",
                   help="train in N processes on this machine, under torchrun (torch.distributed: one per GPU, "
                        "or N on the CPU with gloo); see docs/distributed.md for several machines")
    p.set_defaults(run=_train)

    p = sub.add_parser("eval", help="loss and perplexity, or accuracy and macro-F1 for classification data")
    _file_args(p, "data.format=classification",
               " (default: the config.yaml of the run that wrote --adapter, or --model, beside its final/)")
    _adapter_args(p)
    p.add_argument("--device", default=None,
                   help="auto, cpu, cuda, cuda:N (default: the config's train.device, which is auto unless set)")
    p.add_argument("--data", required=True, help="the evaluation file")
    p.add_argument("--held-out", action="store_true",
                   help="score only what a training run with this config holds out: data.eval_path if it is set, "
                        "else the part of --data split off by data.val_fraction and train.seed "
                        "(data.max_eval_examples caps it), in fp32 as training scores it")
    p.add_argument("--unseen", action="store_true",
                   help="score every classification row a training run on --data with this config never trains "
                        "on: its whole held-out split (data.eval_path if set) and the training rows past "
                        "data.max_examples (a larger sample, so a narrower interval), in fp32; prints each part too")
    p.set_defaults(run=_eval)

    p = sub.add_parser("icl", help="few-shot and zero-shot classification by in-context prompting")
    _file_args(p, "data.label_column=score")
    p.add_argument("--data", required=True, help="the evaluation file (classification rows)")
    p.add_argument("--train", default=None, help="the pool of demonstrations (default: the rest of --data)")
    p.add_argument("--shots", type=_int_from(0), default=0, help="demonstrations per prompt; 0 is zero-shot")
    p.add_argument("--mode", choices=["chat", "chat_turns", "raw"], default="chat",
                   help="chat: one user message holding the demonstrations; chat_turns: one turn pair each; "
                        "raw: plain text, no chat template")
    p.add_argument("--strategy", choices=["random", "nearest"], default="random",
                   help="demonstrations drawn at random (seeded) or nearest to each query by embedding")
    p.add_argument("--calibrate", action="store_true", help="divide out the label prior of content-free inputs")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the draw of --strategy random's demonstrations (default 0); the split of --data "
                        "follows train.seed")
    p.set_defaults(run=_icl)

    p = sub.add_parser("compare", help="run several methods on one task and tabulate what each buys")
    _config_args(p, "a run configuration with a compare section", "configs/compare-sentiment.yaml")
    p.set_defaults(run=_compare)

    p = sub.add_parser("ui", help="a local web page to set up, launch, watch, compare and try runs "
                                  "(needs the ui extra)")
    p.add_argument("--runs", default="runs", metavar="DIR", help="the runs folder: listed, and where new runs go")
    p.add_argument("--data", action="append", default=None, metavar="DIR",
                   help="a folder of data files and models the page may use (repeatable; default: data)")
    p.add_argument("--port", type=int, default=7860, help="the port (0 takes any free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on; every request needs the access token printed at start")
    p.set_defaults(run=_ui)

    p = sub.add_parser("data", help="what a run learns from its data: the counts, and examples with the tokens "
                                    "that carry loss marked")
    _config_args(p)
    p.add_argument("--examples", type=_int_from(0), default=1, help="how many examples to show (default 1)")
    p.add_argument("--split", choices=("train", "eval"), default="train", help="which split's examples to show")
    p.set_defaults(run=_data)

    p = sub.add_parser("config", help="check a run configuration and print it with every default filled in "
                                      "(a comparison: its rows as they will run)")
    _config_args(p, "the run configuration to check")
    p.set_defaults(run=_config)
    return parser


def _terminate(signum, _frame) -> None:
    raise Interrupted(signum)


def _one_line_warning(default):
    """warnings.formatwarning for the command line: tuneforge's own warnings (``TuneforgeWarning``) as one
    line, ``tuneforge: warning: ...``, without the file, line number and source line that Python adds
    (``--debug`` keeps them); any other warning as Python prints it."""
    def formatted(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, TuneforgeWarning):
            return f"tuneforge: warning: {message}\n"
        return default(message, category, filename, lineno, line)
    return formatted


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    keep_freed_memory()  # before torch's first large allocation (core.host)
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends a command as Ctrl-C does
        signal.signal(signal.SIGTERM, _terminate)
    default_format = warnings.formatwarning
    if not args.debug:
        warnings.formatwarning = _one_line_warning(default_format)
    try:
        args.run(args)
    except UserError as exc:
        if args.debug:  # the traceback, then the same line and exit code as without --debug
            traceback.print_exc()
        rank = f" (process {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"tuneforge: error{rank}: {exc.line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # 130 for Ctrl-C, 143 for SIGTERM; a training run said where it saved
        if not (isinstance(exc, Interrupted) and exc.reported):
            print("tuneforge: interrupted", file=sys.stderr)
        return exc.exit_code if isinstance(exc, Interrupted) else 130
    finally:
        warnings.formatwarning = default_format
    return 0


if __name__ == "__main__":
    sys.exit(main())
