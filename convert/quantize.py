"""Integer quantization of checkpoints into the compressed-tensors formats transformers and vLLM read.

INT8 W8A8 (`int-quantized`) is data-free: every quantizable projection becomes int8 per output channel + an fp32
`weight_scale` [out, 1], computed shard by shard straight from the source (FP8 sources dequantized on the fly,
never a BF16 copy on disk); everything else passes through byte-identical. Same streaming, resumable, atomic
machinery as the FP8 converters.
"""

import os
from pathlib import Path

import torch
from dsv3.modeling_deepseek.fp8 import FP8_DTYPE, blockwise_dequant, check_scale, is_fp8_linear
from dsv3.modeling_deepseek.quantized import int8_channel_quant

from .checkpoint import CheckpointError, CheckpointReader, PlannedTensor, read_config, resolve_model_path
from .fp8 import DEFAULT_WORKERS, SCALE_SUFFIX, ConvertReport, _run

# Never quantized (REFERENCE.md section 5 and DESIGN.md): the router (a quantized router breaks vLLM), embeddings,
# lm_head, the MTP module's eh_proj and shared head; norms and the correction bias are not Linear layers.
# compressed-tensors matches "re:" entries with re.match against module names.
IGNORE = [
    "lm_head",
    "re:.*mlp\\.gate$",
    "re:.*embed_tokens$",
    "re:.*eh_proj$",
    "re:.*shared_head\\.head$",
]


def int8_quantization_config() -> dict:
    """config.json's quantization_config for compressed-tensors W8A8 int8 (channel weights, dynamic token
    activations), exactly the scheme vLLM's INT8 linear and MoE paths accept."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "channel",
                    "dynamic": False,
                    "group_size": None,
                    "actorder": None,
                    "observer": "minmax",
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "token",
                    "dynamic": True,
                    "group_size": None,
                    "observer": None,
                },
                "output_activations": None,
                "format": "int-quantized",
            }
        },
        "ignore": list(IGNORE),
        "kv_cache_scheme": None,
    }


def _source_quantization(src: Path, config: dict) -> tuple[int, int] | None:
    """The FP8 block size of an FP8 source, None for a BF16/FP16/FP32 one; anything else is refused."""
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method is None:
        return None
    if method != "fp8":
        raise CheckpointError(
            f"{src / 'config.json'}: already quantized ({method}); quantize from an FP8 or BF16 checkpoint"
        )
    return tuple(quant.get("weight_block_size", [128, 128]))


def quantize_int8(
    src: str | os.PathLike, dst: str | os.PathLike, workers: int | None = None, force: bool = False
) -> ConvertReport:
    src, dst = resolve_model_path(str(src)), Path(dst)
    config = read_config(src)
    block = _source_quantization(src, config)
    job = {"job": "quantize-int8", "src": str(src.resolve())}

    def source_weight(name: str, t: torch.Tensor, reader: CheckpointReader) -> torch.Tensor:
        if t.dtype != FP8_DTYPE:
            return t
        scale = reader.get(name + SCALE_SUFFIX)
        return blockwise_dequant(t, scale, torch.float32, block)

    def plan(names: list[str], reader: CheckpointReader) -> list[PlannedTensor]:
        out = []
        for name in names:
            where = src / reader.weight_map[name]
            t = reader.get(name)
            if name.endswith(SCALE_SUFFIX):
                weight = name.removesuffix(SCALE_SUFFIX)
                if weight not in reader or reader.get(weight).dtype != FP8_DTYPE:
                    raise CheckpointError(f"{where}: {name} scales no float8_e4m3fn weight")
                continue  # consumed by its FP8 weight
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and t.dim() == 2 and is_fp8_linear(module):
                if t.dtype == FP8_DTYPE:
                    if block is None or name + SCALE_SUFFIX not in reader:
                        raise CheckpointError(f"{where}: {name} is FP8 but has no {name + SCALE_SUFFIX}")
                    try:
                        check_scale(name, t, reader.get(name + SCALE_SUFFIX), block)
                    except ValueError as err:
                        raise CheckpointError(f"{where}: {err}") from None
                elif not t.is_floating_point():
                    raise CheckpointError(f"{where}: {name} has unexpected dtype {t.dtype} for a weight")
                done: dict[str, torch.Tensor] = {}

                def quantize(buf, name=name, t=t, done=done, where=where):
                    w = source_weight(name, t, reader)
                    if not torch.isfinite(w).all():
                        raise CheckpointError(f"{where}: {name} contains NaN or Inf; cannot quantize it")
                    q, done["scale"] = int8_channel_quant(w)
                    return q

                out.append(PlannedTensor(name, tuple(t.shape), torch.int8, quantize))
                out.append(
                    PlannedTensor(
                        module + ".weight_scale",
                        (t.shape[0], 1),
                        torch.float32,
                        lambda buf, d=done: d.pop("scale"),
                    )
                )
            elif t.dtype == FP8_DTYPE:
                raise CheckpointError(f"{where}: {name} is FP8 but not a projection this tool quantizes")
            else:
                # Everything else passes through in its own dtype, byte for byte.
                out.append(PlannedTensor(name, tuple(t.shape), t.dtype, lambda buf, t=t: buf.copy_(t)))
        return out

    new_config = {k: v for k, v in config.items() if k != "quantization_config"}
    new_config["quantization_config"] = int8_quantization_config()
    if block is not None:
        new_config["torch_dtype"] = "bfloat16"
    return _run(src, dst, job, plan, new_config, force, workers or DEFAULT_WORKERS)
