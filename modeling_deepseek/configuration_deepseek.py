# DeepseekV3Config: reads every field of the official config.json (DeepSeek-V3/R1/V3.1, Kimi-K2, Moonlight)
# and validates the combinations the model relies on. This file is copied into every checkpoint we write, so
# it only uses the stable PretrainedConfig API (custom __init__ + super().__init__(**kwargs)).
from typing import Any

from transformers import PretrainedConfig

from .quantized import INT_QUANT_METHODS, validate_quant_config

# Every checkpoint we save names these classes in config.json's auto_map, like the official repositories do.
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}
# model.config.model_type of a built model (the file and AutoConfig keep "deepseek_v3"); see
# DeepseekV3PreTrainedModel.__init__: it keeps PEFT from treating the per-expert layout as transformers' fused one.
IN_MEMORY_MODEL_TYPE = "deepseek_v3_official_layout"


def layer_index(name: str) -> int | None:
    """The decoder-layer index of a tensor or module name (`model.layers.{i}.` or `layers.{i}.`), else None."""
    parts = name.split(".")
    for j in range(len(parts) - 1):
        if parts[j] == "layers" and parts[j + 1].isdigit():
            return int(parts[j + 1])
    return None


# RoPE types the model implements; anything else is rejected by name instead of silently ignored.
ROPE_TYPES = ("default", "yarn")
# What DeepSeek's own YaRN code (DeepseekV3YarnRotaryEmbedding) uses for keys a rope_scaling dict leaves out;
# transformers' native yarn agrees (beta 32/1; without both mscale and mscale_all_dim the attention factor is
# 0.1 ln(factor) + 1 and the softmax scale is not touched).
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def _normalize_rope(
    rope_theta: float | None,
    rope_scaling: dict[str, Any] | None,
    rope_parameters: dict[str, Any] | None,
    max_position_embeddings: int,
) -> dict[str, Any]:
    """One normalised dict {"rope_type", "rope_theta", ...} from either spelling of the RoPE setup.

    The rule (one source of truth): DeepSeek's spelling, `rope_scaling` + `rope_theta`, is what official
    config.json files carry, what users and DeepSeek's tooling edit, and the only one we write back (to_dict).
    transformers >= 5 spells it `rope_parameters` (rope_type and rope_theta inside); it is read only for what the
    official keys leave unset. So when a config holds both and they disagree, `rope_scaling` wins as a whole and
    `rope_theta` wins for the base - the same precedence transformers' own loader gives `rope_scaling`. A null
    (or absent) key counts as unset here; `config.rope_scaling = None` (also `from_pretrained(...,
    rope_scaling=None)`) is the explicit way to switch scaling off.
    """
    fallback = dict(rope_parameters or {})
    params = dict(rope_scaling) if rope_scaling else dict(fallback)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling.type: unknown rope type {rope_type!r} (supported: {', '.join(ROPE_TYPES)})"
        )
    theta = params.pop("rope_theta", None)
    for candidate in (rope_theta, theta, fallback.get("rope_theta"), 10000.0):
        if candidate is not None:
            theta = float(candidate)
            break
    if theta <= 0:
        raise ValueError(f"rope_theta: must be positive, got {theta}")
    out: dict[str, Any] = {"rope_type": rope_type, "rope_theta": theta}
    if rope_type == "yarn":
        factor = params.pop("factor", None)
        if factor is None or float(factor) < 1.0:
            raise ValueError(f"rope_scaling.factor: yarn needs a factor >= 1, got {factor!r}")
        out["factor"] = float(factor)
        out["original_max_position_embeddings"] = int(
            params.pop("original_max_position_embeddings", None) or max_position_embeddings
        )
        for key, default in YARN_DEFAULTS.items():
            value = params.pop(key, None)
            out[key] = float(default if value is None else value)
    out.update(params)  # keep unknown extras (e.g. attention_factor) so a re-save loses nothing
    return out


def _validate_fp8(quant: dict[str, Any]) -> dict[str, Any]:
    block = quant.get("weight_block_size", [128, 128])
    if not (
        isinstance(block, (list, tuple))
        and len(block) == 2
        and all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise ValueError(
            f"quantization_config.weight_block_size: expected two positive integers, got {block!r}"
        )
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config.fmt: only 'e4m3' is supported, got {quant.get('fmt')!r}")
    if quant.get("scale_fmt", "float") not in ("float", "ue8m0", None):
        raise ValueError(f"quantization_config.scale_fmt: 'float' or 'ue8m0', got {quant.get('scale_fmt')!r}")
    return {**quant, "weight_block_size": list(block)}


class DeepseekV3Config(PretrainedConfig):
    model_type = "deepseek_v3"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 129280,
        hidden_size: int = 7168,
        intermediate_size: int = 18432,
        moe_intermediate_size: int = 2048,
        num_hidden_layers: int = 61,
        num_nextn_predict_layers: int = 1,
        num_attention_heads: int = 128,
        num_key_value_heads: int | None = 128,
        n_shared_experts: int | None = 1,
        n_routed_experts: int | None = 256,
        ep_size: int = 1,
        routed_scaling_factor: float = 2.5,
        kv_lora_rank: int = 512,
        q_lora_rank: int | None = 1536,
        qk_rope_head_dim: int = 64,
        v_head_dim: int = 128,
        qk_nope_head_dim: int = 128,
        topk_method: str = "noaux_tc",
        n_group: int | None = 8,
        topk_group: int | None = 4,
        num_experts_per_tok: int | None = 8,
        moe_layer_freq: int = 1,
        first_k_dense_replace: int = 3,
        norm_topk_prob: bool = True,
        scoring_func: str = "sigmoid",
        aux_loss_alpha: float = 0.001,
        seq_aux: bool = True,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        pretraining_tp: int = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float | None = None,
        rope_scaling: dict[str, Any] | None = None,
        rope_parameters: dict[str, Any] | None = None,
        rope_interleave: bool = True,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        mtp_loss_weight: float = 0.3,
        fp8_mode: str = "dequantize",
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.ep_size = ep_size
        self.routed_scaling_factor = routed_scaling_factor
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.topk_method = topk_method
        self.n_group = 1 if n_group is None else n_group
        self.topk_group = 1 if topk_group is None else topk_group
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_layer_freq = moe_layer_freq
        self.first_k_dense_replace = first_k_dense_replace
        self.norm_topk_prob = norm_topk_prob
        self.scoring_func = scoring_func
        self.aux_loss_alpha = aux_loss_alpha
        self.seq_aux = seq_aux
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pretraining_tp = pretraining_tp
        self.rope_interleave = rope_interleave
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.mtp_loss_weight = mtp_loss_weight
        # FP8 block-quantized checkpoints are handled by our own loader (modeling_deepseek/fp8.py), on any device;
        # transformers' built-in fp8 quantizer must not see them (its CPU dequant breaks on partial blocks), so
        # the config keeps them under its own name and writes them back as `quantization_config` on save.
        # fp8_mode: "dequantize" (to the requested dtype at load) or "keep" (FP8 in memory, dequant per matmul).
        quant = kwargs.get("quantization_config")
        quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
        self.fp8_quantization_config = None
        if isinstance(quant, dict) and quant.get("quant_method") == "fp8":
            kwargs.pop("quantization_config")
            self.fp8_quantization_config = _validate_fp8(quant)
        # Integer formats (compressed-tensors int-quantized / pack-quantized, GPTQ v1) likewise load into our own
        # quantized linears (modeling_deepseek/quantized.py), which keep the weights packed in memory, with or
        # without compressed-tensors installed; transformers' quantizer would decompress them to dense.
        self.int_quantization_config = None
        if isinstance(quant, dict) and quant.get("quant_method") in INT_QUANT_METHODS:
            kwargs.pop("quantization_config")
            self.int_quantization_config = validate_quant_config(quant)
        if fp8_mode not in ("dequantize", "keep"):
            raise ValueError(f"fp8_mode: choose 'dequantize' or 'keep', got {fp8_mode!r}")
        self.fp8_mode = fp8_mode
        # Read the RoPE setup in one place (rule in _normalize_rope); the model only looks at `rope_parameters`.
        self.__dict__["rope_parameters"] = _normalize_rope(
            rope_theta, rope_scaling, rope_parameters, max_position_embeddings
        )
        # Derived, not configurable: transformers' own DeepseekV3 writes these too.
        kwargs.pop("qk_head_dim", None)
        kwargs.pop("head_dim", None)
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.head_dim = qk_rope_head_dim
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        fp8 = out.pop("fp8_quantization_config", None)
        integer = out.pop("int_quantization_config", None)
        out.pop("fp8_mode", None)  # a load-time choice, not a property of the checkpoint
        if fp8 is not None or integer is not None:
            out["quantization_config"] = fp8 if fp8 is not None else integer
        # Only the official spelling, as in DeepSeek's config.json: one copy of the RoPE setup, so editing it in
        # the file takes effect. transformers (native DeepseekV3 too) reads `rope_scaling` into rope_parameters.
        out.pop("rope_parameters", None)
        out["rope_theta"] = self.rope_theta
        out["rope_scaling"] = self.rope_scaling
        return out

    # RoPE: one normalised dict behind three names. from_pretrained(path, rope_scaling=...) sets attributes on the
    # config it read from config.json (not through __init__), so each name normalises on assignment too.
    @property
    def rope_parameters(self) -> dict[str, Any]:
        try:
            return self.__dict__["rope_parameters"]
        except KeyError:
            raise AttributeError("rope_parameters") from None

    @rope_parameters.setter
    def rope_parameters(self, value: dict[str, Any] | None) -> None:
        value = value or {"rope_type": "default", "rope_theta": self.rope_theta}
        self.__dict__["rope_parameters"] = _normalize_rope(None, None, value, self.max_position_embeddings)

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        # DeepSeek's spelling: None for plain RoPE, else {"type": "yarn", "factor": ..., ...} without the theta.
        params = dict(self.rope_parameters)
        rope_type = params.pop("rope_type")
        params.pop("rope_theta")
        return None if rope_type == "default" else {"type": rope_type, **params}

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        # Replaces the scaling, keeps the theta; None (or {}) means plain RoPE. Partial dicts get YARN_DEFAULTS.
        value = value or {"type": "default"}
        self.__dict__["rope_parameters"] = _normalize_rope(
            self.rope_theta, value, None, self.max_position_embeddings
        )

    @property
    def rope_theta(self) -> float:
        return self.rope_parameters["rope_theta"]

    @rope_theta.setter
    def rope_theta(self, value: float) -> None:
        params = {**self.rope_parameters, "rope_theta": value}
        self.__dict__["rope_parameters"] = _normalize_rope(None, None, params, self.max_position_embeddings)

    @property
    def mtp_layer_indices(self) -> range:
        # The MTP module(s) live after the main stack: model.layers.{L + k} (layer 61 for V3).
        return range(self.num_hidden_layers, self.num_hidden_layers + self.num_nextn_predict_layers)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    def _validate(self) -> None:
        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{field}: {why}")

        for field in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "kv_lora_rank",
            "qk_rope_head_dim",
            "qk_nope_head_dim",
            "v_head_dim",
            "intermediate_size",
            "moe_layer_freq",
        ):
            value = getattr(self, field)
            need(isinstance(value, int) and value > 0, field, f"must be a positive integer, got {value!r}")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be null or positive")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(
            self.num_key_value_heads == self.num_attention_heads,
            "num_key_value_heads",
            "MLA shares one latent across all heads; must equal num_attention_heads",
        )
        need(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"must be between 0 and num_hidden_layers ({self.num_hidden_layers}), got {self.first_k_dense_replace}",
        )
        need(self.hidden_act == "silu", "hidden_act", f"only 'silu' is supported, got {self.hidden_act!r}")
        if self.n_routed_experts is None:
            return
        need(
            self.topk_method == "noaux_tc",
            "topk_method",
            f"only 'noaux_tc' is supported, got {self.topk_method!r}",
        )
        need(
            self.scoring_func == "sigmoid",
            "scoring_func",
            f"only 'sigmoid' is supported, got {self.scoring_func!r}",
        )
        need(self.n_routed_experts > 0, "n_routed_experts", "must be positive")
        need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
        need(
            self.n_group > 0 and self.n_routed_experts % self.n_group == 0,
            "n_group",
            f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})",
        )
        need(
            0 < self.topk_group <= self.n_group,
            "topk_group",
            f"must be between 1 and n_group ({self.n_group}), got {self.topk_group}",
        )
        per_group = self.n_routed_experts // self.n_group
        need(
            self.n_group == 1 or per_group >= 2,
            "n_group",
            "group scores sum the top-2 experts of each group, so each group needs >= 2 experts",
        )
        offered = self.topk_group * per_group
        need(
            self.num_experts_per_tok is not None and 0 < self.num_experts_per_tok <= offered,
            "num_experts_per_tok",
            f"must be between 1 and the {offered} experts the kept groups offer, got {self.num_experts_per_tok}",
        )
        need(self.n_shared_experts is None or self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
