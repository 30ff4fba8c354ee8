"""Built-in tiny checkpoints: small random models in the exact official layout (config, sharded safetensors with
index, generation config, tokenizer, remote code), so everything runs without a download."""

import os
from pathlib import Path

import torch
from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config
from dsv3.modeling_deepseek.fp8 import blockwise_quant, fp8_quantization_config, is_fp8_weight
from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3ForCausalLM

from .checkpoint import ShardWriter, atomic_write_json, copy_remote_code, with_auto_map
from .record import new_record, write_record

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"

# Shapes are chosen so the FP8 block layout is exercised like the real model: kv_a_proj_with_mqa has 576 rows
# (4.5 blocks of 128, as in V3), q_a_proj 192 rows (1.5 blocks, divides evenly by its 2 scale rows), expert
# matrices 96 wide (one partial block).
PRESETS: dict[str, dict] = {
    "v3": dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=3,
        num_nextn_predict_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=16,
        routed_scaling_factor=2.5,
        kv_lora_rank=512,
        q_lora_rank=192,
        qk_rope_head_dim=64,
        v_head_dim=64,
        qk_nope_head_dim=64,
        topk_method="noaux_tc",
        n_group=4,
        topk_group=2,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        max_position_embeddings=163840,
        rms_norm_eps=1e-6,
        rope_theta=10000,
        rope_scaling={
            "type": "yarn",
            "factor": 40,
            "original_max_position_embeddings": 4096,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
    "moonlight": dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=3,
        num_nextn_predict_layers=0,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=2,
        n_routed_experts=8,
        routed_scaling_factor=2.446,
        kv_lora_rank=128,
        q_lora_rank=None,
        qk_rope_head_dim=32,
        v_head_dim=64,
        qk_nope_head_dim=64,
        topk_method="noaux_tc",
        n_group=1,
        topk_group=1,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=50000,
        rope_scaling=None,
    ),
    "kimi": dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=384,
        moe_intermediate_size=96,
        num_hidden_layers=2,
        num_nextn_predict_layers=0,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_shared_experts=1,
        n_routed_experts=12,
        routed_scaling_factor=2.827,
        kv_lora_rank=128,
        q_lora_rank=192,
        qk_rope_head_dim=64,
        v_head_dim=64,
        qk_nope_head_dim=64,
        topk_method="noaux_tc",
        n_group=1,
        topk_group=1,
        num_experts_per_tok=4,
        first_k_dense_replace=1,
        norm_topk_prob=True,
        scoring_func="sigmoid",
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        rope_theta=50000,
        rope_scaling={
            "type": "yarn",
            "factor": 32,
            "original_max_position_embeddings": 4096,
            "beta_fast": 1,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    ),
}

# A few paragraphs of plain English so the tiny tokenizer learns real merges without any download.
TOKENIZER_TEXT = """
The model reads a sequence of tokens and predicts the next one. Each layer mixes information across positions
with attention and then transforms every position with a feed-forward network. In a mixture of experts, a small
router picks a few experts for each token, so the model can be large while each token only uses a small part.
Multi-head latent attention compresses keys and values into a short latent vector, which keeps the cache small
when the model generates long texts. Multi-token prediction adds a module that predicts the token after next,
which helps training and can be used to draft tokens for speculative decoding. Numbers such as 0, 1, 2, 3, 4, 5,
6, 7, 8, 9, 10, 42, 128 and 2048 appear in code and in arithmetic questions; punctuation (commas, periods,
colons: and semicolons;) and quotes "like these" appear in prose. def main(): return print("hello, world")
Once upon a time there was a small model that wanted to learn. It read stories about kings and queens, about
rivers and mountains, about numbers and letters, and every day it became a little better at guessing the next
word. The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
"""


def tiny_config(preset: str = "v3") -> DeepseekV3Config:
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown {preset!r} (choose from {', '.join(PRESETS)})")
    return DeepseekV3Config(
        **PRESETS[preset],
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.05,
    )


def random_tiny_model(preset: str = "v3", seed: int = 0) -> DeepseekV3ForCausalLM:
    """A randomly initialised tiny model whose router bias and norms are not at their trivial defaults, so tests
    exercise every term (bias-driven expert selection, norm weights)."""
    config = tiny_config(preset)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05)
            elif "norm" in name:
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=gen))
    return model


def train_bpe_tokenizer(texts: list[str], vocab_size: int, model_max_length: int = 16384):
    """A byte-level BPE tokenizer (DeepSeek's special tokens at ids 0, 1, 2), trained locally: no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="left",
    )


def build_tokenizer(out: Path, vocab_size: int):
    fast = train_bpe_tokenizer([TOKENIZER_TEXT] * 4, vocab_size)
    fast.save_pretrained(out)
    return fast


def write_official_layout(
    model: DeepseekV3ForCausalLM,
    out: Path,
    dtype: torch.dtype = torch.bfloat16,
    fp8: bool = False,
    max_shard_bytes: int = 2 * 2**20,
) -> dict:
    """Save like the official repositories: several shards + index, the MTP layer included, config with
    auto_map, remote code; with fp8, the projections as float8_e4m3fn + weight_scale_inv (quantized from the
    BF16 values, float scales) exactly where DeepSeek's FP8 release has them."""
    writer = ShardWriter(out, max_shard_bytes=max_shard_bytes)
    for name, tensor in model.state_dict().items():
        # The router's correction bias stays fp32 on disk, like the official checkpoints.
        keep_fp32 = name.endswith("e_score_correction_bias")
        t = tensor.detach().to(torch.float32 if keep_fp32 else dtype).cpu()
        if fp8 and is_fp8_weight(name, t):
            q, scale = blockwise_quant(t)
            writer.add(name, q)
            writer.add(name + "_scale_inv", scale)
        else:
            writer.add(name, t)
    index = writer.close()
    config = model.config.to_dict()
    if fp8:
        config["quantization_config"] = fp8_quantization_config()
    config.update(architectures=["DeepseekV3ForCausalLM"], torch_dtype=str(dtype).removeprefix("torch."))
    config.pop("dtype", None)
    atomic_write_json(out / "config.json", with_auto_map(config))
    copy_remote_code(out)
    return index


# What an earlier build_tiny may have left that a new one would not overwrite by name: shards of another count,
# a single-file checkpoint, unfinished shards. Everything else it writes has a fixed name and is replaced.
STALE_WEIGHT_PATTERNS = ("model-*-of-*.safetensors", "model.safetensors", "shard-*.partial", "*.tmp")


def build_tiny(
    out: str | os.PathLike, preset: str = "v3", seed: int = 0, fp8: bool = False, force: bool = False
) -> Path:
    """Refuses a non-empty `out` unless `force`; with it, removes only weight files a checkpoint writer like
    this one leaves (so no stale shard of an earlier build survives) and keeps anything else."""
    out = Path(out)
    model = random_tiny_model(preset, seed)  # validates the preset before anything is touched
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force or not out.is_dir():
            raise ValueError(f"{out}: exists and is not empty (use --force to overwrite)")
        for pattern in STALE_WEIGHT_PATTERNS:
            for stale in out.glob(pattern):
                stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_official_layout(model, out, torch.bfloat16, fp8=fp8)
    build_tokenizer(out, model.config.vocab_size)
    atomic_write_json(
        out / "generation_config.json",
        {
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
            "do_sample": True,
            "temperature": 0.6,
            "top_p": 0.95,
        },
    )
    write_record(out, new_record(None, "tiny", {"preset": preset, "seed": seed, "fp8": fp8}))
    return out
