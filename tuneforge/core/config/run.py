"""The run configuration: one typed, frozen RunCfg for every command.

A YAML file is data: it is read into these dataclasses, ``--set key.sub=value`` overrides a field
with that field's own type, and an unknown key, a wrong type or a missing required field is a
UserError naming the key and the file before any work starts. The ``method`` section is checked
against the chosen method's own Config (``tuneforge.core.config.methods``). Each field's comment is its
help. Nothing here imports torch: a config is checked before any model code loads.
"""

from __future__ import annotations

import math

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from tuneforge.core.config.parse import FromCli, Where, build, line_numbers, load_yaml
from tuneforge.core.errors import UserError, at_least, fraction
from tuneforge.core.config.methods import DEFAULT_METHOD, METHODS


@dataclass(frozen=True)
class MethodCfg:
    name: str = DEFAULT_METHOD  # the fine-tuning method: one of tuneforge.core.config.methods.METHODS
    # The method's own keys (for LoRA PEFT's names: r, lora_alpha, target_modules, ...), checked
    # against that method's Config at parse time; in YAML they sit beside `name`.
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceCfg:
    """One source of a data mixture (``data.path`` as a list); a key left unset is data's own."""

    path: str  # a data file or `datasets` folder, as data.path takes one
    format: str | None = None  # this source's data.format; instruction and completion sources mix
    columns: list[str] | None = None  # this source's data.columns (a CSV/TSV file without a header row)
    text_column: str | None = None  # this source's data.text_column
    weight: float = 1.0  # this source's share of the training examples: weight / the sum of the weights
    max_rows: int | None = None  # read at most this many of its rows (a seeded sample) before mixing

    def __post_init__(self):
        at_least(self, "weight", 0, "data.path", above=True)
        at_least(self, "max_rows", 1, "data.path")
        formats = typing.get_args(typing.get_type_hints(DataCfg)["format"])
        if self.format is not None and self.format not in formats:
            raise UserError(f"{self.format!r} is not allowed", "data.path.format",
                            fix=f"use one of {', '.join(formats)}")


def check_thresholds(thresholds) -> tuple[float, float]:
    """``data.score_thresholds`` as (low, high), or a UserError: two numbers, low <= high."""
    if len(thresholds) != 2 or thresholds[0] > thresholds[1]:
        raise UserError(f"score_thresholds must be [low, high] with low <= high, got {thresholds}",
                        "data.score_thresholds", fix="for example [-1.0, 1.0]")
    return thresholds[0], thresholds[1]


@dataclass(frozen=True)
class DataCfg:
    # training data: a file (.jsonl, .json, .csv, .tsv, .parquet, .arrow or plain text), a folder written by
    # `datasets`' save_to_disk, or a list of sources ({path, weight, max_rows, format, columns, text_column}, or a path)
    # mixed by weight: docs/formats.md
    path: str | list[SourceCfg | str] | None = None
    eval_path: str | None = None  # held-out file; without it a val_fraction of `path` is held out
    # instruction covers every chat form (Alpaca, OpenAI messages, ShareGPT, TRL's conversational
    # prompt/completion), detected from the rows; preference rows (prompt/chosen/rejected) are read for
    # preference tuning
    format: Literal["text", "instruction", "completion", "classification", "preference"] = "text"
    text_column: str = "text"  # the text of a row (classification, completion prompts fall back to it)
    label_column: str = "label"  # classification label (or a numeric score, with score_thresholds)
    prompt_column: str = "prompt"  # completion format: the prompt
    completion_column: str = "completion"  # completion format: the target
    columns: list[str] | None = None  # column names for a CSV/TSV file without a header row
    verbalizer: dict[str, str] | None = None  # label -> the word the model answers; default: the label itself
    score_thresholds: list[float] | None = None  # [lo, hi]: score <= lo is "negative", >= hi "positive", others dropped
    instruction: str | None = None  # classification: the question put before each text
    max_length: int = 512  # tokens per example (text: per block); longer examples are truncated and counted
    val_fraction: float = 0.1  # share held out for validation when eval_path is not given
    max_examples: int | None = None  # use at most this many training examples (after the split)
    max_eval_examples: int | None = None  # evaluate on at most this many held-out examples
    # supervised examples packed several to a row up to max_length, each attending only to itself (position
    # ids restart at each); raw text is always packed into blocks
    packing: bool = False
    group_by_length: bool = False  # supervised batches of examples of similar length (little padding)
    chat_template: bool = True  # render prompts with the tokenizer's chat template when it has one
    train_on_prompt: bool = False  # also put loss on the prompt tokens
    train_on_turns: Literal["all", "last"] = "all"  # which assistant turns of a conversation carry loss
    mask_reasoning: bool = False  # keep reasoning spans (<think>...</think>) of an answer out of the loss
    roles: dict[str, str] | None = None  # role names (ShareGPT's, a message's) -> user/assistant/system/tool

    def __post_init__(self):
        if isinstance(self.path, list):  # a source given as its path alone takes every default
            object.__setattr__(self, "path", [SourceCfg(s) if isinstance(s, str) else s for s in self.path])
        at_least(self, "max_length", 2, "data")
        fraction(self, "val_fraction", "data")
        at_least(self, "max_examples", 1, "data")
        at_least(self, "max_eval_examples", 1, "data")
        if self.score_thresholds is not None:
            check_thresholds(self.score_thresholds)
        if self.packing and self.group_by_length:
            raise UserError("packing and group_by_length are two ways to little padding, and a run takes one",
                            "data.group_by_length", fix="set one of data.packing and data.group_by_length")


@dataclass(frozen=True)
class TrainCfg:
    output_dir: str = "runs/run"  # config.yaml, metrics.jsonl, checkpoints/ and final/ go here
    max_steps: int | None = None  # optimizer steps; when set it wins over epochs
    epochs: float = 1.0  # passes over the training data
    batch_size: int = 8  # examples per micro-batch (with data.packing: packed rows of up to data.max_length tokens)
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-4
    weight_decay: float = 0.0  # applied to matrices only, never to biases, norms or vectors
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0  # linear warm-up from zero
    max_grad_norm: float = 1.0  # gradient clipping; 0 turns it off
    seed: int = 0
    save_steps: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # keep the last K checkpoints
    eval_steps: int = 0  # evaluate every N steps (0: only at the end)
    eval_at_start: bool = False  # also evaluate before the first step (the "before" of before/after)
    logging_steps: int = 10  # a metrics.jsonl line every N steps
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    early_stopping_patience: int = 0  # stop after N evaluations without improvement (0: never)
    time_budget_s: float | None = None  # stop training after this many seconds
    # A step whose loss or gradients are not finite stops the run (the last checkpoint kept); with N
    # above 0, up to N such steps are skipped instead (their batch is logged) before it stops
    skip_nonfinite_steps: int = 0
    # Under torchrun (docs/distributed.md): shard an adapter method's model with FSDP2 too (full
    # fine-tuning always is), and how long a rank waits for the others before the run ends with an error
    fsdp: bool = False
    dist_timeout_s: float = 300.0
    # What a step's loss is (docs/preference.md): sft, or a preference objective on data.format: preference
    # rows. dpo and kto compare with the model the run starts from (the method switched off; for full
    # fine-tuning its log-probabilities, computed once before training); orpo and simpo need no reference.
    objective: Literal["sft", "dpo", "orpo", "simpo", "kto"] = "sft"
    beta: float = 0.1  # dpo, kto: the reward scale beta; orpo: the odds-ratio weight (lambda); simpo: beta
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"  # dpo: the sigmoid loss, or IPO's squared one
    label_smoothing: float = 0.0  # dpo (sigmoid), simpo: the share of pairs taken to be flipped (cDPO)
    simpo_gamma: float = 0.5  # simpo: the reward margin gamma
    cpo_alpha: float = 0.0  # simpo: weight of the chosen answers' cross-entropy added (CPO's term; 0 is SimPO)
    desirable_weight: float = 1.0  # kto: weight of a desirable answer's loss
    undesirable_weight: float = 1.0  # kto: weight of an undesirable answer's loss
    # An adapter folder (an SFT LoRA, say) merged into the base before the method goes in: training starts
    # from base + that adapter, and so does DPO's and KTO's reference (never the bare base by mistake)
    start_from: str | None = None

    def steps(self, batches_per_epoch: int, world: int = 1) -> int:
        """The run's optimizer steps: max_steps, or the epochs' micro-batches over grad_accum x world (each
        step takes that many, each process its share). The loop and the estimate both count so. A step of more
        micro-batches than an epoch holds is refused: it would pass over the data more than once."""
        per_step = self.grad_accum * world
        if per_step > batches_per_epoch:
            processes = f" on each of {world} processes" if world > 1 else ""
            most, passes = batches_per_epoch // world, per_step / batches_per_epoch
            raise UserError(f"an optimizer step takes {self.grad_accum} micro-batches{processes} and an epoch has "
                            f"{batches_per_epoch}: each step would pass over the data "
                            f"{f'{passes:.1f}' if passes < 10 else f'{passes:,.0f}'} times", "train.grad_accum",
                            fix=f"set grad_accum to {most} or less" if most else
                            "use fewer processes or a smaller train.batch_size")
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * batches_per_epoch / (self.grad_accum * world)))

    def __post_init__(self):
        for key, low in (("max_steps", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0),
                         ("max_grad_norm", 0), ("save_steps", 0), ("keep_checkpoints", 1), ("eval_steps", 0),
                         ("logging_steps", 1), ("early_stopping_patience", 0), ("weight_decay", 0),
                         ("skip_nonfinite_steps", 0)):
            at_least(self, key, low, "train")
        for key in ("epochs", "learning_rate", "time_budget_s", "dist_timeout_s", "beta"):
            at_least(self, key, 0, "train", above=True)
        for key in ("simpo_gamma", "cpo_alpha", "desirable_weight", "undesirable_weight"):
            at_least(self, key, 0, "train")
        if self.device != "auto":  # the name alone: whether this machine has it is known where the run starts
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise UserError(f"unknown device {self.device!r}", "train.device",
                                fix="use auto, cpu, cuda or cuda:N") from None
        if not 0 <= self.seed < 2**32:  # the data order and each process's draws are seeded with multiples of it
            raise UserError(f"seed must be at least 0 and below 2**32, got {self.seed}", "train.seed",
                            fix="correct the value")
        if self.dist_timeout_s > 86_400:
            raise UserError(f"dist_timeout_s is {self.dist_timeout_s:g}; a process waits a day at most",
                            "train.dist_timeout_s", fix="set a number of seconds up to 86400")
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"train.label_smoothing is {self.label_smoothing}; it must be at least 0 and below 0.5",
                            "train.label_smoothing", fix="set a share of flipped pairs in [0, 0.5), or 0")


@dataclass(frozen=True)
class EvalCfg:
    batch_size: int = 8  # rows per held-out batch of pairs (preference) and of the reference's log-probabilities
    # the most token positions in a batch of label scoring or language-model loss, padding included: rows of
    # similar length fill it. null: batch_size x data.max_length
    batch_tokens: int | None = None
    max_examples: int | None = None  # evaluate on at most this many examples

    def __post_init__(self):
        at_least(self, "batch_size", 1, "eval")
        at_least(self, "batch_tokens", 1, "eval")
        at_least(self, "max_examples", 1, "eval")


@dataclass(frozen=True)
class CompareCfg:
    output_dir: str = "runs/compare"  # compare.md, compare.csv, compare.png and one folder per row
    # Rows: {name: <method>, label: <row name>, train: {<train overrides>}, <method keys>...}; the
    # names zero-shot and few-shot (keys shots, mode, strategy, calibrate) are in-context rows.
    methods: list[dict[str, Any]] = field(default_factory=list)
    transfer_path: str | None = None  # a second domain's file, evaluated with every trained artifact


@dataclass(frozen=True)
class RunCfg:
    model: str = "smollm2-135m"  # a named model, a Hugging Face model directory, or a .gguf file
    # read a model folder whose weights are only pickled (pytorch_model.bin), with torch's weights-only
    # loader; off, such a folder is refused, since unpickling a file can run code
    allow_pickle: bool = False
    method: MethodCfg = field(default_factory=MethodCfg)
    data: DataCfg = field(default_factory=DataCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    compare: CompareCfg = field(default_factory=CompareCfg)  # only `tuneforge compare` reads this

    def __post_init__(self):
        objective, preference = self.train.objective, self.data.format == "preference"
        if preference and objective == "sft":
            raise UserError("preference rows (prompt/chosen/rejected) train under a preference objective",
                            "train.objective", fix="set train.objective: dpo (or orpo, simpo, kto)")
        if objective != "sft" and not preference:
            raise UserError(f"train.objective {objective} trains on preference rows, not {self.data.format!r} data",
                            "data.format", fix="set data.format: preference (rows of prompt, chosen and rejected)")
        if preference and (self.data.packing or self.data.group_by_length):
            raise UserError("a preference pair is its own batch rows; packing does not apply", "data.packing",
                            fix="set data.packing and data.group_by_length to false")

    @property
    def eval_batch_tokens(self) -> int:
        """Positions per held-out batch of label scoring or loss: eval.batch_tokens, or what eval.batch_size
        rows of data.max_length tokens hold."""
        return self.eval.batch_tokens or self.eval.batch_size * self.data.max_length


def _method_cfg(raw: Any, where: Where) -> MethodCfg:
    if isinstance(raw, (str, FromCli)):
        raw = {"name": str(raw)}
    if not isinstance(raw, dict):
        raise UserError(f"expected a mapping with 'name', got {raw!r}", where("method"))
    raw = dict(raw)
    named, switched = "name" in raw, isinstance(raw.get("name"), FromCli)
    name = str(raw.pop("name", DEFAULT_METHOD))
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}", where("method.name"), fix=f"use one of {', '.join(METHODS)}")
    keys = [f.name for f in dataclasses.fields(METHODS[name].config)]
    if not named and (stray := next((str(k) for k in raw if k not in keys), None)):
        owners = [m for m, row in METHODS.items() if stray in {f.name for f in dataclasses.fields(row.config)}]
        pick = owners[0] if owners else "NAME"
        raise UserError(f"no method.name is given, so the method is {DEFAULT_METHOD}, the default, and "
                        f"'{stray}' is not among its keys ({', '.join(keys)})"
                        + (f"; {stray} is a key of {', '.join(owners)}" if owners else ""), where(f"method.{stray}"),
                        fix=f"choose the method with method.name, one of {', '.join(METHODS)}: --set method.name={pick}"
                            f", or `name: {pick}` under `method:` in the file")
    if switched and (stray := next((str(k) for k in raw if k not in keys and not isinstance(raw[k], FromCli)), None)):
        raise UserError(f"--set method.name={name} changed the method, and '{stray}' is a key of the file's method, "
                        f"not of {name} ({', '.join(keys)})", where(f"method.{stray}"),
                        fix=f"drop {stray} from the file's method section, or change method.name in the file")
    config = build(METHODS[name].config, raw, where, prefix="method.")
    return MethodCfg(name=name, args=dataclasses.asdict(config))


def _set(tree: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = tree.get(k)
        if node is None or isinstance(node, str):  # `method: lora` grows into a mapping
            node = {"name": node} if isinstance(node, str) else {}
            tree[k] = node
        if not isinstance(node, dict):
            raise UserError(f"'{k}' is not a section", where)
        tree = node
    tree[keys[-1]] = value


def from_dict(raw: Mapping[str, Any], overrides: list[str] = (), source: str = "config",
              lines: Mapping[str, int] | None = None) -> RunCfg:
    """A RunCfg from plain data, as a YAML file would hold it: the way to build a config in Python.

        from_dict({"method": {"name": "lora", "r": 8}, "data": {"path": "train.jsonl"}})

    ``overrides`` are ``key.sub=value`` strings, as ``--set`` takes them; ``source`` and ``lines``
    name where the data came from in error messages."""
    raw = dict(raw)
    from_cli = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"cannot read override {item!r}", "--set", fix="write --set key.sub=value")
        _set(raw, key.strip(), FromCli(value), f"--set {item}")
        from_cli.add(key.strip())
    where = Where(source, lines or {}, from_cli)
    method = _method_cfg(raw.pop("method", {}), where)
    cfg = build(RunCfg, raw, where)
    return dataclasses.replace(cfg, method=method)


def from_yaml(path: str | Path, overrides: list[str] = ()) -> RunCfg:
    """Read a run configuration from YAML, apply ``key.sub=value`` overrides, validate it all."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("no such config file", str(path), fix="check the path") from None
    except IsADirectoryError:
        raise UserError("a folder, not a config file", str(path),
                        fix="give the YAML file (a run's folder holds its own as config.yaml)") from None
    except PermissionError:
        raise UserError("the config file cannot be read (permission denied)", str(path),
                        fix="allow reading it") from None
    except UnicodeDecodeError:
        raise UserError("the file is not UTF-8 text", str(path), fix="save it as UTF-8") from None

    def located(key: str, line: int | None) -> str:
        return f"{path}:{line}: key '{key}'" if line else f"{path}: key '{key}'" if key else str(path)

    try:
        raw = load_yaml(text, located) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"invalid YAML: {problem}", where, fix="fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise UserError("the top level must be a mapping of sections (model, method, data, train, eval)", str(path))
    return from_dict(raw, overrides, source=str(path), lines=line_numbers(text))


def to_dict(cfg: RunCfg) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["method"] = {"name": cfg.method.name, **cfg.method.args}
    return out


def to_yaml(cfg: RunCfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def method_config(cfg: RunCfg | MethodCfg):
    """The method's own Config instance for a run."""
    m = cfg.method if isinstance(cfg, RunCfg) else cfg
    return METHODS[m.name].config(**m.args)


def with_method(cfg: RunCfg, name: str, method_cfg) -> RunCfg:
    """``cfg`` with its method section replaced by ``method_cfg`` (an instance of that method's Config)."""
    return dataclasses.replace(cfg, method=MethodCfg(name=name, args=dataclasses.asdict(method_cfg)))
