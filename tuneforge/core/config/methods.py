"""Every method's configuration keys, as frozen dataclasses, and ``METHODS``: the one table of methods,
from a name to the method's module (imported on first use) and its Config.

The configs live apart from the methods' code so that a run configuration is checked (every key, type and
range) without importing torch; each method module exposes its own as ``Config``. Keys follow PEFT's
names where PEFT has the method, so an adapter_config.json reads straight into them. A field's
comment is its documentation. A check names its key as ``method.<key>``, as a YAML file writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from tuneforge.core.errors import UserError, at_least, fraction

REGEX_CHARS = set("*+?()[]{}|\\^$")


def as_pattern(names):
    """The config parser reads a lone string as a one-item list; a regex or "all-linear" is a string."""
    if isinstance(names, list) and len(names) == 1 and (names[0] == "all-linear" or REGEX_CHARS & set(names[0])):
        return names[0]
    return names


def no_empty_targets(cfg, what: str) -> None:
    if cfg.target_modules == []:
        raise UserError(f"target_modules is empty, so {what} would train nothing", "method.target_modules",
                        fix="name the layers to adapt, or null for the family's default")


def _at_least(cfg, key: str, low: float, above: bool = False) -> None:
    at_least(cfg, key, low, "method", above)


def _fraction(cfg, key: str) -> None:
    fraction(cfg, key, "method")


@dataclass(frozen=True)
class FullConfig:
    freeze_embeddings: bool = False  # keep the input embeddings (and a head tied to them) frozen
    freeze_layers: int = 0  # keep the first k transformer blocks frozen

    def __post_init__(self):
        _at_least(self, "freeze_layers", 0)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8  # rank of the update
    lora_alpha: float = 16  # the update is scaled by lora_alpha / r (or / sqrt(r) with use_rslora)
    lora_dropout: float = 0.0  # dropout on the adapter's input
    # names (["q_proj", "v_proj"]), a regular expression over module paths, or "all-linear"; null: the
    # model family's attention pair, as PEFT picks it (q_proj and v_proj on llama, c_attn on GPT-2)
    target_modules: list[str] | str | None = None
    use_rslora: bool = False  # scale by lora_alpha / sqrt(r): higher ranks keep learning
    use_dora: bool = False  # learn a magnitude per output row as well (DoRA)
    modules_to_save: list[str] | None = None  # whole modules trained and saved besides the adapter (e.g. lm_head)
    bias: str = "none"  # PEFT's bias training; only "none" is supported
    init_lora_weights: bool | str = True  # True: B = 0 (identity at start); "gaussian"; False: B random too
    # Mixture-of-Experts models keep each block's experts as 3-D parameters, not linear layers: these paths
    # select them as PEFT's target_parameters does (the whole path or its last dotted parts), and each gets
    # a rank-r update per expert. For an MoE model set its family's list (qwen3_moe, mixtral, gpt_oss):
    # target_parameters: [mlp.experts.gate_up_proj, mlp.experts.down_proj]; with target_modules: [] only
    # the experts are adapted. null: no expert parameters. lora_dropout and use_dora do not apply to them.
    target_parameters: list[str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", as_pattern(self.target_modules))
        _at_least(self, "r", 1)
        _at_least(self, "lora_alpha", 0, above=True)  # 0 scales the update away: nothing would train
        _fraction(self, "lora_dropout")
        if self.target_modules == [] and not self.target_parameters:
            raise UserError("target_modules is empty and target_parameters is unset, so LoRA would train nothing",
                            "method.target_modules", fix="name the layers to adapt, or null for the family's default")
        for key, neutral in (("lora_dropout", "0"), ("use_dora", "false")):
            if self.target_parameters and getattr(self, key):
                raise UserError(f"{key} does not apply to target_parameters: their update is added to the experts' "
                                "weights, not computed from a layer's input", f"method.{key}",
                                fix=f"set {key}: {neutral}, or drop target_parameters")
        if self.bias != "none":
            raise UserError(f"bias={self.bias!r} is not supported", "method.bias", fix='use bias: "none"')
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise UserError(f"init_lora_weights={self.init_lora_weights!r} is not supported",
                            "method.init_lora_weights", fix='use true, false or "gaussian"')


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """LoRA's keys with LoRA's defaults, then the quantization of the targeted layers."""

    block_size: int = 64  # weights per absmax scale
    double_quant: bool = True  # store the scales in 8 bits too: about 4.127 instead of 4.5 bits per weight
    # the dtype the weights are rebuilt in for each matmul; auto: fp32 on CPU, bf16 on CUDA
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def __post_init__(self):
        super().__post_init__()
        if self.target_parameters:
            raise UserError("QLoRA quantizes linear layers, and the experts' 3-D parameters are not quantized",
                            "method.target_parameters", fix="use method lora to adapt the experts")
        if self.block_size < 2 or self.block_size % 2:
            raise UserError(f"block_size must be a positive even number, got {self.block_size}", "method.block_size",
                            fix="use 64, as QLoRA does")

    def lora(self) -> LoraConfig:
        """LoRA's share of the keys."""
        return LoraConfig(**{f.name: getattr(self, f.name) for f in fields(LoraConfig)})


@dataclass(frozen=True)
class AdapterConfig:
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"  # houlsby: after attention and MLP; pfeiffer: MLP only
    bottleneck_size: int | None = None  # width of the bottleneck; None: hidden size // reduction_factor
    reduction_factor: int = 16  # used when bottleneck_size is None
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = "relu"  # between the down- and up-projection
    train_norms: bool = False  # also train every RMSNorm / LayerNorm weight (Houlsby trains them)
    dropout: float = 0.0  # dropout on the bottleneck activations
    # names of each block's attention output and MLP output; null: the model family's (o_proj, down_proj on llama)
    attn_output_modules: list[str] | None = None
    mlp_output_modules: list[str] | None = None

    def __post_init__(self):
        _at_least(self, "bottleneck_size", 1)
        _at_least(self, "reduction_factor", 1)
        _fraction(self, "dropout")


@dataclass(frozen=True)
class IA3Config:
    # names, a regular expression over module paths, or "all-linear"; null: the model family's keys,
    # values and MLP output (k_proj, v_proj, down_proj on llama)
    target_modules: list[str] | str | None = None
    # those targets whose input, not output, is scaled (PEFT requires them to be among the targets);
    # null: the family's MLP output, where the targets include it
    feedforward_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None  # whole modules trained and saved besides the vectors
    init_ia3_weights: bool = True  # True: vectors of ones (identity at start); False: random normal, as PEFT

    def __post_init__(self):
        object.__setattr__(self, "target_modules", as_pattern(self.target_modules))
        object.__setattr__(self, "feedforward_modules", as_pattern(self.feedforward_modules))
        no_empty_targets(self, "IA3")


@dataclass(frozen=True)
class VeraConfig:
    # rank: rows of the shared random projections; a layer trains only r + out numbers, so r runs far above LoRA's
    r: int = 256
    # names, a regular expression over module paths, or "all-linear"; null: the model family's, as PEFT picks
    # them (LoRA's: q_proj and v_proj on llama)
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0  # seed of the frozen projections vera_A and vera_B (PEFT's generator, on the CPU)
    save_projection: bool = True  # write vera_A and vera_B into the adapter file; false: rebuilt from the seed
    vera_dropout: float = 0.0  # dropout on the layer's input to the update
    d_initial: float = 0.1  # start value of every lambda_d (the paper finds <= 0.1 best)
    modules_to_save: list[str] | None = None  # whole modules trained and saved besides the vectors
    bias: str = "none"  # PEFT's bias training; only "none" is supported
    init_weights: bool = True  # True: lambda_b = 0 (identity at start), lambda_d = d_initial; False: random, as PEFT

    def __post_init__(self):
        object.__setattr__(self, "target_modules", as_pattern(self.target_modules))
        no_empty_targets(self, "VeRA")
        _at_least(self, "r", 1)
        _fraction(self, "vera_dropout")
        if self.bias != "none":
            raise UserError(f"bias={self.bias!r} is not supported", "method.bias", fix='use bias: "none"')


@dataclass(frozen=True)
class VirtualTokenShape:
    """The model's shape as PEFT records it for prompt and prefix tuning; null: taken from the model,
    else checked against it."""

    token_dim: int | None = None
    num_layers: int | None = None
    num_attention_heads: int | None = None
    num_transformer_submodules: int | None = None


@dataclass(frozen=True)
class PromptConfig(VirtualTokenShape):
    num_virtual_tokens: int = 20  # length of the soft prompt: trainable vectors of the model's hidden size
    # RANDOM: normal, with the standard deviation of the model's embeddings; SAMPLE_VOCAB: the
    # embeddings of random tokens; TEXT: of prompt_tuning_init_text's tokens, repeated or cut to length
    prompt_tuning_init: Literal["RANDOM", "SAMPLE_VOCAB", "TEXT"] = "RANDOM"
    prompt_tuning_init_text: str | None = None  # TEXT: e.g. "Classify the sentiment of this review:"
    # TEXT: the tokenizer (a folder or hub name) that splits the text; default: the model's own folder
    tokenizer_name_or_path: str | None = None

    def __post_init__(self):
        _at_least(self, "num_virtual_tokens", 1)
        if self.prompt_tuning_init == "TEXT" and not self.prompt_tuning_init_text:
            raise UserError("prompt_tuning_init TEXT needs the text", "method.prompt_tuning_init_text",
                            fix="set prompt_tuning_init_text, or use RANDOM or SAMPLE_VOCAB")


@dataclass(frozen=True)
class PrefixConfig(VirtualTokenShape):
    """For prefix tuning PEFT records token_dim = kv_heads * head_dim and num_attention_heads = kv_heads."""

    num_virtual_tokens: int = 20  # prefix length: key/value vectors per layer
    prefix_projection: bool = False  # train the prefix through an MLP over an embedding; saved folded
    encoder_hidden_size: int | None = None  # width of that MLP; null: kv_heads * head_dim, as PEFT
    # null: normal(0, 1) as PEFT; "zero": an all-zero prefix (not the identity: zero keys still draw attention)
    init_weights: Literal["zero"] | None = None
    # Start from the keys and values the model itself computes for this text (its tokens repeated or
    # cut to num_virtual_tokens), as Li & Liang recommend: at step 0 the model behaves exactly as if
    # the text came before every input, instead of attending to random vectors. Wins over init_weights.
    init_text: str | None = None
    tokenizer_name_or_path: str | None = None  # init_text's tokenizer; default: the model's own folder

    def __post_init__(self):
        _at_least(self, "num_virtual_tokens", 1)
        _at_least(self, "encoder_hidden_size", 1)
        if self.init_text is not None and self.prefix_projection:
            raise UserError("init_text sets the prefix itself, which prefix_projection computes through an MLP",
                            "method.init_text", fix="drop init_text, or set prefix_projection: false")


@dataclass(frozen=True)
class FeaturesConfig:
    # hidden state to read: 0 = the embeddings, i = block i's output, -1 = the last (after the final
    # norm); "best": the one whose classifier scores best on a held-out fifth of the training texts
    layer: int | Literal["best"] = -1
    pooling: Literal["mean", "last"] = "mean"  # average the text's tokens, or take its last token
    classifier: Literal["logreg"] = "logreg"  # scikit-learn's LogisticRegression (files of 0.1.0 name it)
    C: float = 1.0  # inverse strength of the L2 penalty of the logistic regression (scikit-learn's C)
    max_iter: int = 1000  # solver iterations
    batch_size: int = 16  # texts per forward pass
    max_length: int = 256  # tokens per text; a longer text is cut at the end

    def __post_init__(self):
        _at_least(self, "C", 0, above=True)
        for key in ("max_iter", "batch_size", "max_length"):
            _at_least(self, key, 1)


@dataclass(frozen=True)
class Method:
    """A row of ``METHODS``: the method's module, by its import path so that checking a config imports no
    torch (``methods.registry.get_method`` imports it), and its Config."""

    module: str
    config: type


DEFAULT_METHOD = "full"
METHODS: dict[str, Method] = {
    "full": Method("tuneforge.methods.full", FullConfig),
    "lora": Method("tuneforge.methods.lora", LoraConfig),
    "qlora": Method("tuneforge.methods.qlora", QLoraConfig),
    "adapter": Method("tuneforge.methods.adapter", AdapterConfig),
    "ia3": Method("tuneforge.methods.ia3", IA3Config),
    "vera": Method("tuneforge.methods.vera", VeraConfig),
    "prefix": Method("tuneforge.methods.prefix", PrefixConfig),
    "prompt": Method("tuneforge.methods.prompt", PromptConfig),
    "features": Method("tuneforge.methods.features", FeaturesConfig),
}
