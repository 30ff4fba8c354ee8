"""GPTQ for whole checkpoints, one decoder layer at a time, straight from the source shards.

Memory holds one layer's attention, one expert at a time, the layer's Hessians and the calibration activations;
never the model. Per layer i (main stack, then the MTP module(s)):

  1. attention: Hessians of its projections from the float attention on the layer input h (the output of the
     already-quantized layers < i); quantize; h_mid = h + attn_q(input_layernorm(h)) with the quantized weights.
  2. MLP on X = post_attention_layernorm(h_mid): every routed expert sees *all* calibration tokens, so the
     gate/up projections of every expert (and of the shared expert / dense MLP) share one Hessian H_X; each
     down_proj gets its own from act(gate X) * up X. The layer output still uses only the routed experts:
     out = h_mid + shared_q(X) + sum over top-k of w * expert_q(X), with the router in fp32, never quantized.
  3. write the layer's shard (quantized projections packed; norms, router, bias, MTP extras byte-identical;
     FP8 projections left unquantized become BF16), flush the activations, record the layer as done.

Activations live in memory-mapped files in the destination (double-buffered: input, output, and a scratch for X),
so the kernel keeps them in RAM while they fit and pages them out when they do not; after each layer they are
flushed, which makes every finished layer a resume point for an interrupted job.

A Hessian that cannot be factorized at any dampening falls back to round-to-nearest (recorded per module).
"""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config
from dsv3.modeling_deepseek.fp8 import FP8_DTYPE, blockwise_dequant, check_scale
from dsv3.modeling_deepseek.modeling_deepseek import (
    DeepseekV3Attention,
    DeepseekV3MLP,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
    DeepseekV3TopkRouter,
    attention_mask_4d,
)
from dsv3.modeling_deepseek.quantized import PACK_BITS, pack_int32
from torch import nn

from .checkpoint import (
    INDEX_NAME,
    CheckpointError,
    CheckpointReader,
    atomic_write_json,
    copy_remote_code,
    copy_side_files,
    fsync_dir,
    read_config,
    resolve_model_path,
    with_auto_map,
    write_shard,
)
from .fp8 import (
    JOB_KEY,
    MARKER,
    SCALE_SUFFIX,
    _exclusive,
    _job_id,
    _prepare_destination,
    _read_json,
    _refuse_overlap,
)
from .fp8 import _sigterm_unwinds as sigterm_unwinds
from .gptq import DAMP_STEPS, GPTQResult, HessianAccumulator, dequantize, gptq_quantize, rtn
from .quantize import IGNORE, _source_quantization
from .record import new_record, now, sha256_file, write_record

STATE = ".dsv3-gptq-state.json"
# Layer input / output (alternating), the MLP's normed input X, the MTP block's input.
ACTS = (".dsv3-gptq-acts-a.bin", ".dsv3-gptq-acts-b.bin", ".dsv3-gptq-acts-x.bin", ".dsv3-gptq-acts-m.bin")
WORK_FILES = (STATE, *ACTS)
TARGETS = ("all", "experts")
FORMATS = ("compressed-tensors", "gptq")
METHODS = ("gptq", "rtn")
EXPERT_TARGET = r"re:.*mlp\.experts\.\d+\.(gate|up|down)_proj$"
EXPERT_BATCH_BYTES = (
    2**30
)  # float weights of the routed experts quantized together (one stacked gate/up pass)


@dataclass
class GPTQOptions:
    bits: int = 4
    group_size: int = 128
    nsamples: int = 128
    seqlen: int = 512
    act_order: bool = False
    targets: str = "all"  # "all" linears of the decoder blocks, or the routed "experts" only
    fmt: str = "compressed-tensors"  # pack-quantized; or "gptq" (v1: qweight/qzeros/scales/g_idx)
    method: str = "gptq"  # "rtn": the data-free round-to-nearest baseline, same scales and format
    chunk: int = 8  # calibration samples per forward
    device: str = "cpu"

    def job(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("chunk", "device")}


@dataclass
class GPTQReport:
    dst: Path
    layers: int = 0
    layers_resumed: int = 0
    modules: int = 0
    fallbacks: dict = field(default_factory=dict)  # module -> "rtn" | "damp=<f>"
    seconds: float = 0.0
    already_complete: bool = False

    def summary(self) -> str:
        if self.already_complete:
            return f"{self.dst}: already complete; nothing to do"
        fb = f", {len(self.fallbacks)} fallbacks (see dsv3_record.json)" if self.fallbacks else ""
        return (
            f"{self.dst}: {self.modules} linears quantized in {self.layers} layers "
            f"({self.layers_resumed} resumed){fb} in {self.seconds:.1f}s"
        )


# ------------------------------------------------------------------------------------------ validation
def _linear_inputs(config: DeepseekV3Config, targets: str) -> dict[str, int]:
    """Input width of every kind of projection `targets` quantizes, keyed by the config field that sets it."""
    moe = {
        "moe_intermediate_size (experts' down_proj)": config.moe_intermediate_size,
        "hidden_size": config.hidden_size,
    }
    if targets == "experts":
        return moe
    out = {**moe, "intermediate_size (dense down_proj)": config.intermediate_size}
    out["kv_lora_rank (kv_b_proj)"] = config.kv_lora_rank
    out["num_attention_heads x v_head_dim (o_proj)"] = config.num_attention_heads * config.v_head_dim
    if config.q_lora_rank is not None:
        out["q_lora_rank (q_b_proj)"] = config.q_lora_rank
    if config.n_shared_experts:
        out["moe_intermediate_size x n_shared_experts"] = (
            config.moe_intermediate_size * config.n_shared_experts
        )
    return out


def check_options(opts: GPTQOptions, config: DeepseekV3Config) -> None:
    if opts.bits not in PACK_BITS:
        raise ValueError(f"--bits: supported {list(PACK_BITS)}, got {opts.bits}")
    for name, value, allowed in (
        ("--targets", opts.targets, TARGETS),
        ("--format", opts.fmt, FORMATS),
        ("method", opts.method, METHODS),
    ):
        if value not in allowed:
            raise ValueError(f"{name}: one of {', '.join(allowed)}, got {value!r}")
    if opts.nsamples < 1 or opts.seqlen < 2 or opts.chunk < 1:
        raise ValueError(f"--nsamples/--seqlen: need >= 1 / >= 2, got {opts.nsamples} / {opts.seqlen}")
    per = 32 // opts.bits
    if opts.group_size < per or opts.group_size % per:
        raise ValueError(f"--group-size: must be a positive multiple of {per} for {opts.bits}-bit packing")
    for field_name, width in _linear_inputs(config, opts.targets).items():
        if width % opts.group_size:
            raise ValueError(f"--group-size: {opts.group_size} does not divide {field_name} = {width}")


def calibration_ids(calib: Path, tokenizer, nsamples: int, seqlen: int) -> torch.Tensor:
    """(nsamples, seqlen) token ids: non-overlapping windows spread evenly over the tokenized file."""
    try:
        text = calib.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--calib {calib}: no such file") from None
    except (UnicodeDecodeError, IsADirectoryError) as err:
        raise ValueError(f"--calib {calib}: not a UTF-8 text file ({err.__class__.__name__})") from None
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    need = nsamples * seqlen
    if len(ids) < need:
        raise ValueError(
            f"--calib {calib}: {len(ids):,} tokens, fewer than --nsamples x --seqlen = {nsamples} x {seqlen} "
            f"= {need:,}; give more text or lower them"
        )
    stride = len(ids) // nsamples
    return torch.stack([ids[i * stride : i * stride + seqlen] for i in range(nsamples)])


# ------------------------------------------------------------------------------------------ the format
def quantization_config(opts: GPTQOptions, config: DeepseekV3Config) -> dict:
    """config.json's quantization_config for what this job writes."""
    if opts.fmt == "gptq":
        # Every Linear of model.* is a GPTQ linear except these module prefixes (the loaders' convention).
        skip = []
        for i in config.mtp_layer_indices:
            skip += [f"model.layers.{i}.eh_proj", f"model.layers.{i}.shared_head.head"]
        if opts.targets == "experts":
            for i in [*range(config.num_hidden_layers), *config.mtp_layer_indices]:
                skip.append(f"model.layers.{i}.self_attn")
                if config.is_moe_layer(i):
                    skip.append(f"model.layers.{i}.mlp.shared_experts")
                else:
                    skip.append(f"model.layers.{i}.mlp")
        return {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",
            "bits": opts.bits,
            "group_size": opts.group_size,
            "desc_act": opts.act_order,
            "sym": True,
            "true_sequential": True,
            "damp_percent": 0.01,
            "modules_to_not_convert": ["lm_head", *sorted(set(skip))],
        }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": [EXPERT_TARGET] if opts.targets == "experts" else ["Linear"],
                "weights": {
                    "num_bits": opts.bits,
                    "type": "int",
                    "symmetric": True,
                    "strategy": "group",
                    "group_size": opts.group_size,
                    "dynamic": False,
                    "actorder": "weight" if opts.act_order else None,
                    "observer": "minmax",
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": list(IGNORE),
        "kv_cache_scheme": None,
    }


def packed_tensors(module: str, result: GPTQResult, opts: GPTQOptions) -> dict[str, torch.Tensor]:
    """The tensors one quantized Linear is stored as, in the job's format."""
    q, scale = result.q.cpu(), result.scale.cpu()
    O, I = q.shape
    if opts.fmt == "gptq":
        g_idx = result.g_idx.cpu() if result.g_idx is not None else torch.arange(I) // opts.group_size
        G = I // opts.group_size
        return {
            module + ".qweight": pack_int32(q.t(), opts.bits, dim=0),  # (I * b / 32, O)
            # v1 stores zero points minus one: the symmetric zero 2^(b-1) is kept as 2^(b-1) - 1, i.e. code -1
            module + ".qzeros": pack_int32(torch.full((G, O), -1, dtype=torch.int8), opts.bits, dim=1),
            module + ".scales": scale.to(torch.float16).t().contiguous(),  # (G, O)
            module + ".g_idx": g_idx.to(torch.int32).clone(),
        }
    out = {
        module + ".weight_packed": pack_int32(q, opts.bits),  # (O, I * b / 32)
        module
        + ".weight_scale": scale.clone(),  # (O, G), bf16; own storage (stacked modules share one result)
        module + ".weight_shape": torch.tensor([O, I], dtype=torch.int64),
    }
    if result.g_idx is not None:
        out[module + ".weight_g_idx"] = result.g_idx.cpu().to(torch.int32).clone()
    return out


# ------------------------------------------------------------------------------------------ activations
class Activations:
    """(N, S, D) fp32 buffers backed by files in DST: `inp` (the layer input), `out` (its output), `x` (scratch:
    the normed MLP input) and `m` (scratch: an MTP block's input). swap() makes the output the next layer's
    input. `inp` is never written while its layer runs, so a killed job resumes from it."""

    def __init__(self, dst: Path, shape: tuple[int, int, int], first: int = 0) -> None:
        self.dst, self.shape, self.first = dst, shape, first
        self._maps = {}
        for name in ACTS:
            path = dst / name
            mode = "r+" if path.is_file() and path.stat().st_size == int(np.prod(shape)) * 4 else "w+"
            self._maps[name] = np.memmap(path, dtype=np.float32, mode=mode, shape=shape)

    def _t(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self._maps[name])

    @property
    def inp(self) -> torch.Tensor:
        return self._t(ACTS[self.first])

    @property
    def out(self) -> torch.Tensor:
        return self._t(ACTS[1 - self.first])

    @property
    def x(self) -> torch.Tensor:
        return self._t(ACTS[2])

    @property
    def m(self) -> torch.Tensor:
        return self._t(ACTS[3])

    def flush(self) -> None:
        self._maps[ACTS[1 - self.first]].flush()

    def swap(self) -> None:
        self.first = 1 - self.first

    def close(self) -> None:
        self._maps.clear()


# ------------------------------------------------------------------------------------------ one layer
class _LayerSource:
    """A layer's source tensors, as the float weights the calibration runs on (FP8 dequantized)."""

    def __init__(self, reader: CheckpointReader, block, dtype: torch.dtype, device: str) -> None:
        self.reader, self.block, self.dtype, self.device = reader, block, dtype, device

    def weight(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        if t.dtype == FP8_DTYPE:
            where = self.reader.folder / self.reader.weight_map[name]
            if self.block is None or name + SCALE_SUFFIX not in self.reader:
                raise CheckpointError(f"{where}: {name} is FP8 but has no {name + SCALE_SUFFIX}")
            scale = self.reader.get(name + SCALE_SUFFIX)
            try:
                check_scale(name, t, scale, self.block)
            except ValueError as err:
                raise CheckpointError(f"{where}: {err}") from None
            t = blockwise_dequant(t, scale, torch.float32, self.block)
        elif not t.is_floating_point():
            raise CheckpointError(
                f"{self.reader.folder}: {name} has dtype {t.dtype}, expected a float weight"
            )
        return t.to(self.device, self.dtype)

    def build(self, module: nn.Module, prefix: str) -> nn.Module:
        """`module` (built on the meta device) with its tensors from `prefix` in the source."""
        names = module.state_dict().keys()
        state = {}
        for key in names:
            name = prefix + key
            if name not in self.reader:
                raise CheckpointError(f"{self.reader.folder / INDEX_NAME}: no tensor {name}")
            t = self.reader.get(name)
            state[key] = self.weight(name) if t.dtype == FP8_DTYPE or key.endswith("weight") else t
        module.load_state_dict(state, strict=True, assign=True)
        for buf_name, buf in module.named_buffers():
            if buf.is_meta:  # non-persistent statistics (the router's expert_load): not in a checkpoint
                parent, _, leaf = buf_name.rpartition(".")
                setattr(
                    module.get_submodule(parent) if parent else module,
                    leaf,
                    torch.zeros_like(buf, device="cpu"),
                )
        return module.to(self.device).eval()


def _meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


class LayerQuantizer:
    """Quantizes one decoder block in place (its Linear weights become the dequantized quantized values) and
    collects the packed tensors for the output shard."""

    def __init__(self, opts: GPTQOptions, config: DeepseekV3Config, prefix: str, progress=None) -> None:
        self.opts, self.config, self.prefix = opts, config, prefix
        self.packed: dict[str, torch.Tensor] = {}
        self.fallbacks: dict[str, str] = {}
        self.quantized: set[str] = set()  # full module names
        self.progress = progress

    def wanted(self, rel: str) -> bool:
        if self.opts.targets == "experts":
            return ".experts." in rel
        return True

    def quantize(self, rel: str, linear: nn.Linear, H: torch.Tensor | None) -> None:
        self.quantize_stacked([(rel, linear)], H)

    def quantize_stacked(self, items: list[tuple[str, nn.Linear]], H: torch.Tensor | None) -> None:
        """Quantize Linears that share one Hessian (same input: e.g. gate/up of a batch of experts) in a single
        GPTQ pass over their stacked rows. GPTQ treats output rows independently given H, so this equals
        quantizing each alone, with one column loop instead of one per module."""
        opts = self.opts
        scale_dtype = torch.float16 if opts.fmt == "gptq" else torch.bfloat16
        for rel, linear in items:
            if not torch.isfinite(linear.weight).all():
                raise CheckpointError(f"{self.prefix + rel}.weight contains NaN or Inf; cannot quantize it")
        W = torch.cat([linear.weight.data for _, linear in items])
        if opts.method == "rtn" or H is None:
            q, scale = rtn(W, opts.bits, opts.group_size, scale_dtype)
            result, fallback = GPTQResult(q, scale, None, "rtn", float("nan"), 0), None
        else:
            # compressed-tensors >= 0.20 knows only actorder "weight" (static groups, no g_idx); GPTQ v1 keeps
            # desc_act's g_idx.
            result = gptq_quantize(
                W, H, opts.bits, opts.group_size, opts.act_order, scale_dtype=scale_dtype,
                static_groups=opts.fmt == "compressed-tensors",
            )  # fmt: skip
            fallback = (
                "rtn (Hessian not factorizable at any dampening)"
                if result.method == "rtn"
                else f"damp={result.damp}"
                if result.damp > DAMP_STEPS[0]
                else None
            )
        row = 0
        for rel, linear in items:
            name, rows = self.prefix + rel, linear.weight.shape[0]
            part = replace(result, q=result.q[row : row + rows], scale=result.scale[row : row + rows])
            row += rows
            if not torch.isfinite(part.scale.float()).all():
                raise CheckpointError(
                    f"{name}: a scale overflows {scale_dtype} (weights too large for this format)"
                )
            if fallback:
                self.fallbacks[name] = fallback
            self.packed.update(packed_tensors(name, part, opts))
            linear.weight.data = dequantize(part, opts.group_size, linear.weight.dtype).to(
                linear.weight.device
            )
            self.quantized.add(name)
        if self.progress is not None:
            self.progress.set_postfix_str(items[-1][0], refresh=False)


def _hessian(acc: dict, key: str, x: torch.Tensor) -> None:
    if key not in acc:
        acc[key] = HessianAccumulator(x.shape[-1], device=x.device)
    acc[key].add(x)


def _calibrate_attention(
    attn: DeepseekV3Attention,
    lq: LayerQuantizer,
    norm: DeepseekV3RMSNorm,
    inp: torch.Tensor,
    S: int,
    rope,
    mask,
    chunk: int,
    device: str,
) -> None:
    """Hessians of the attention projections (one forward pass with hooks), then quantize them in order."""
    linears = {
        n: m for n, m in attn.named_modules() if isinstance(m, nn.Linear) and lq.wanted("self_attn." + n)
    }
    acc: dict[str, HessianAccumulator] = {}
    if linears and lq.opts.method == "gptq":
        hooks = [
            m.register_forward_pre_hook(lambda mod, args, n=n: _hessian(acc, n, args[0]))
            for n, m in linears.items()
        ]
        try:
            for i in range(0, inp.shape[0], chunk):
                x = norm(inp[i : i + chunk, :S].to(device))
                attn(x, rope(x.shape[0]), mask(x.shape[0]))
        finally:
            for h in hooks:
                h.remove()
        missing = sorted(set(linears) - set(acc))
        if missing:  # a projection the forward never called through its module: its Hessian would be empty
            raise RuntimeError(f"{lq.prefix}self_attn.{missing[0]}: saw no calibration input")
    for n, m in linears.items():
        lq.quantize("self_attn." + n, m, acc.pop(n).H if n in acc else None)


def _mlp_hessians_and_quantize(mlps: dict[str, DeepseekV3MLP], lq: LayerQuantizer, H_x, xs) -> None:
    """MLPs on the same input X (a batch of experts, or one shared/dense MLP): gate/up of all of them with the
    shared H_X in one stacked pass; each down_proj with its own Hessian from act(gate X) * up X over all tokens
    (computed with the float weights, before gate/up are quantized)."""
    mlps = {rel: m for rel, m in mlps.items() if lq.wanted(rel + ".gate_proj")}
    if not mlps:
        return
    acc: dict[str, HessianAccumulator] = {}
    if lq.opts.method == "gptq":
        for x in xs():
            for rel, mlp in mlps.items():
                _hessian(acc, rel, F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    stacked = [
        (f"{rel}.{proj}", getattr(m, proj)) for rel, m in mlps.items() for proj in ("gate_proj", "up_proj")
    ]
    lq.quantize_stacked(stacked, H_x)
    for rel, mlp in mlps.items():
        lq.quantize(rel + ".down_proj", mlp.down_proj, acc.pop(rel).H if rel in acc else None)


@torch.no_grad()
def quantize_layer(
    src: _LayerSource,
    config: DeepseekV3Config,
    layer_idx: int,
    bufs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    S: int,
    lq: LayerQuantizer,
    rope,
    mask,
    chunk: int,
) -> None:
    """Layer `layer_idx` on inp[:, :S] -> out[:, :S] (bufs = inp, out, x scratch), quantizing its projections
    (module docstring)."""
    p, dev = f"model.layers.{layer_idx}.", src.device
    inp, out, x_buf = bufs
    N = inp.shape[0]
    in_norm = src.build(
        _meta(lambda: DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps)), p + "input_layernorm."
    )
    post_norm = src.build(
        _meta(lambda: DeepseekV3RMSNorm(config.hidden_size, config.rms_norm_eps)),
        p + "post_attention_layernorm.",
    )
    attn = src.build(_meta(lambda: DeepseekV3Attention(config, layer_idx)), p + "self_attn.")
    _calibrate_attention(attn, lq, in_norm, inp, S, rope, mask, chunk, dev)
    # h_mid = h + attn_q(norm(h)) into `out`; X = post_norm(h_mid) into the scratch buffer.
    for i in range(0, N, chunk):
        h = inp[i : i + chunk, :S].to(dev)
        h_mid = h + attn(in_norm(h), rope(h.shape[0]), mask(h.shape[0]))[0]
        out[i : i + chunk, :S] = h_mid.cpu()
        x_buf[i : i + chunk, :S] = post_norm(h_mid).cpu()
    del attn

    def xs():
        for i in range(0, N, chunk):
            yield x_buf[i : i + chunk, :S].to(dev)

    H_x = None
    if lq.opts.method == "gptq":
        acc: dict[str, HessianAccumulator] = {}
        for x in xs():
            _hessian(acc, "x", x)
        H_x = acc["x"].H

    def add_output(fn) -> None:  # out[:, :S] += fn(X), chunk by chunk
        for i in range(0, N, chunk):
            x = x_buf[i : i + chunk, :S].to(dev)
            out[i : i + chunk, :S] += fn(x, i).cpu()

    if not config.is_moe_layer(layer_idx):
        mlp = src.build(_meta(lambda: DeepseekV3MLP(config)), p + "mlp.")
        _mlp_hessians_and_quantize({"mlp": mlp}, lq, H_x, xs)
        add_output(lambda x, i: mlp(x))
        return
    router = src.build(_meta(lambda: DeepseekV3TopkRouter(config)), p + "mlp.gate.")
    routes = [router(x.reshape(-1, x.shape[-1]))[:2] for x in xs()]  # per chunk: (idx_MK, weight_MK)
    if config.n_shared_experts:
        inner = config.moe_intermediate_size * config.n_shared_experts
        shared = src.build(_meta(lambda: DeepseekV3MLP(config, inner)), p + "mlp.shared_experts.")
        _mlp_hessians_and_quantize({"mlp.shared_experts": shared}, lq, H_x, xs)
        add_output(lambda x, i: shared(x))
        del shared
    # Experts in batches of about EXPERT_BATCH_BYTES of float weights: memory holds one batch, never the layer.
    E, I = config.n_routed_experts, config.moe_intermediate_size
    batch = max(1, EXPERT_BATCH_BYTES // (3 * I * config.hidden_size * 4))
    for e0 in range(0, E, batch):
        experts = {
            e: src.build(_meta(lambda: DeepseekV3MLP(config, I)), p + f"mlp.experts.{e}.")
            for e in range(e0, min(E, e0 + batch))
        }
        _mlp_hessians_and_quantize({f"mlp.experts.{e}": m for e, m in experts.items()}, lq, H_x, xs)

        def routed(x, i, experts=experts):
            # Only the tokens the router sends to an expert contribute, weighted like the model does.
            idx_MK, weight_MK = routes[i // chunk]
            x_MD = x.reshape(-1, x.shape[-1])
            y_MD = torch.zeros_like(x_MD)
            for e, expert in experts.items():
                tok, slot = (idx_MK == e).nonzero(as_tuple=True)
                if len(tok):
                    y_MD[tok] += (expert(x_MD[tok]).float() * weight_MK[tok, slot, None]).to(x_MD.dtype)
            return y_MD.view_as(x)

        add_output(routed)
        del experts


# ------------------------------------------------------------------------------------------ the job
def _layer_tensors(
    reader: CheckpointReader, names: list[str], lq: LayerQuantizer, block
) -> dict[str, torch.Tensor]:
    """The output shard of one layer: packed projections, everything else as stored (FP8 -> BF16)."""
    out = dict(lq.packed)
    for name in names:
        if name.endswith(SCALE_SUFFIX) or name.removesuffix(".weight") in lq.quantized:
            continue
        t = reader.get(name)
        if t.dtype == FP8_DTYPE:
            t = blockwise_dequant(t, reader.get(name + SCALE_SUFFIX), torch.bfloat16, block)
        out[name] = t.contiguous()
    return out


def _shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def quantize_gptq(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calib: str | os.PathLike,
    opts: GPTQOptions | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> GPTQReport:
    """Quantize checkpoint SRC into DST (module docstring). Resumes an interrupted job with the same parameters."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    t0, started = time.perf_counter(), now()
    opts = opts or GPTQOptions()
    src, dst, calib = resolve_model_path(str(src)), Path(dst), Path(calib)
    src_config = read_config(src)
    block = _source_quantization(src, src_config)
    config = DeepseekV3Config.from_pretrained(src)
    check_options(opts, config)
    reader = CheckpointReader(src)
    _refuse_overlap(src, dst, reader)
    tokenizer = AutoTokenizer.from_pretrained(src)
    ids_NS = calibration_ids(calib, tokenizer, opts.nsamples, opts.seqlen)
    job = {"job": "quantize-gptq", **opts.job(), "calib": calib.name, "calib_sha256": sha256_file(calib)}
    job_id = _job_id(src, reader, job)
    layers = [*range(config.num_hidden_layers), *config.mtp_layer_indices]
    n_shards = 1 + len(layers)
    new_config = {k: v for k, v in src_config.items() if k != "quantization_config"}
    new_config["quantization_config"] = quantization_config(opts, config)
    if block is not None:
        new_config["torch_dtype"] = "bfloat16"
    new_config = with_auto_map(new_config)
    report = GPTQReport(dst)
    by_layer: dict[int, list[str]] = {}
    rest = []
    for name in reader:
        parts = name.split(".")
        if name.startswith("model.layers.") and parts[2].isdigit():
            by_layer.setdefault(int(parts[2]), []).append(name)
        else:
            rest.append(name)
    unknown = sorted(set(by_layer) - set(layers))
    if unknown:
        raise CheckpointError(
            f"{src / INDEX_NAME}: tensors of model.layers.{unknown[0]}, a layer the config has not"
        )

    # No autograd anywhere: a Hessian accumulated in place from grad-tracking activations would keep every
    # forward's graph alive.
    with _exclusive(dst), sigterm_unwinds(), torch.no_grad():
        index = _read_json(dst / INDEX_NAME)
        if not force and (index.get("metadata") or {}).get(JOB_KEY) == job_id and not (dst / MARKER).exists():
            report.already_complete = True
            return report
        marker = {"id": job_id, **job, "src": str(src.resolve())}
        # A resumed job keeps its state and activation files; a fresh one starts from an empty destination.
        state = _read_json(dst / STATE) if _read_json(dst / MARKER).get("id") == job_id else {}
        _prepare_destination(dst, marker, set(), force or False)
        if not state:
            for name in WORK_FILES:
                (dst / name).unlink(missing_ok=True)
        weight_map: dict[str, str] = {}
        device, dtype = opts.device, torch.float32
        source = _LayerSource(reader, block, dtype, device)
        N, S, D = opts.nsamples, opts.seqlen, config.hidden_size
        acts = Activations(dst, (N, S, D), first=state.get("first", 0))
        done = state.get("done", [])
        fallbacks: dict[str, str] = state.get("fallbacks", {})
        rotary = DeepseekV3RotaryEmbedding(config).to(device)

        # Shard 1: everything outside the decoder layers (embeddings, final norm, lm_head), as stored.
        shard = _shard_name(1, n_shards)
        weight_map.update(dict.fromkeys(rest, shard))
        if not done:
            write_shard(dst / shard, {n: reader.get(n).contiguous() for n in rest})
            embed = reader.get("model.embed_tokens.weight").to(device, dtype)
            for i in range(0, N, opts.chunk):
                acts.inp[i : i + opts.chunk] = F.embedding(ids_NS[i : i + opts.chunk].to(device), embed).cpu()
            acts._maps[ACTS[acts.first]].flush()
            del embed
        quiet = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").lower() in ("1", "true", "yes")
        bar = tqdm(total=len(layers), desc="gptq", unit="layer", initial=len(done), disable=quiet)
        try:
            for k, layer_idx in enumerate(layers, start=2):
                shard = _shard_name(k, n_shards)
                depth = layer_idx - config.num_hidden_layers + 1  # MTP depth (<= 0: main stack)
                S_l = S - max(depth, 0)
                if layer_idx in done:
                    weight_map.update(dict.fromkeys(_shard_keys(dst / shard), shard))
                    report.layers_resumed += 1
                    continue
                inp = acts.inp
                if (
                    depth >= 1
                ):  # the MTP block's input, built in its own buffer (acts.inp stays the resume point)
                    _mtp_input(source, config, layer_idx, acts.inp, acts.m, ids_NS, opts.chunk)
                    inp = acts.m
                positions = torch.arange(S_l, device=device)
                cos_sin = rotary(positions[None])

                def rope(b, cos_sin=cos_sin):
                    return cos_sin[0].expand(b, -1, -1), cos_sin[1].expand(b, -1, -1)

                def mask(b, S_l=S_l):
                    return attention_mask_4d(None, b, S_l, 0, torch.device(device))

                lq = LayerQuantizer(opts, config, f"model.layers.{layer_idx}.", bar)
                quantize_layer(
                    source, config, layer_idx, (inp, acts.out, acts.x), S_l, lq, rope, mask, opts.chunk
                )
                tensors = _layer_tensors(reader, by_layer.get(layer_idx, []), lq, block)
                write_shard(dst / shard, tensors)
                weight_map.update(dict.fromkeys(tensors, shard))
                report.modules += len(lq.quantized)
                fallbacks.update(lq.fallbacks)
                acts.flush()
                acts.swap()
                done.append(layer_idx)
                atomic_write_json(dst / STATE, {"first": acts.first, "done": done, "fallbacks": fallbacks})
                report.layers += 1
                reader.close()
                bar.update(1)
        finally:
            bar.close()
            acts.close()
        report.fallbacks = fallbacks
        copy_side_files(src, dst)
        copy_remote_code(dst)
        atomic_write_json(dst / "config.json", new_config)
        results = {
            "layers": len(layers),
            "modules_quantized": sum(1 for n in weight_map if n.endswith((".weight_packed", ".qweight"))),
            "fallbacks": fallbacks,
            "fallback_counts": _count_fallbacks(fallbacks),
        }
        params = {k: v for k, v in job.items() if k != "job"}
        write_record(dst, new_record(src, "quantize-gptq", params, results, started=started))
        total = sum(
            _tensor_bytes(dst / s) for s in set(weight_map.values())
        )  # data bytes, as the index defines
        atomic_write_json(
            dst / INDEX_NAME,
            {
                "metadata": {"total_size": total, JOB_KEY: job_id},
                "weight_map": dict(sorted(weight_map.items())),
            },
        )
        for name in (*WORK_FILES, MARKER):
            (dst / name).unlink(missing_ok=True)
        fsync_dir(dst)
    report.seconds = time.perf_counter() - t0
    if log:
        log(report.summary())
    return report


def _count_fallbacks(fallbacks: dict[str, str]) -> dict[str, int]:
    counts = {"rtn": 0, "extra_dampening": 0}
    for how in fallbacks.values():
        counts["rtn" if how.startswith("rtn") else "extra_dampening"] += 1
    return counts


def _mtp_input(
    source, config, layer_idx: int, inp: torch.Tensor, out: torch.Tensor, ids_NS, chunk: int
) -> None:
    """The MTP block's input at position i: eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)]), into `out`. h is the
    main model's normed last hidden state for depth 1, the previous MTP block's output after that."""
    p, dev, k = f"model.layers.{layer_idx}.", source.device, layer_idx - config.num_hidden_layers + 1
    S = ids_NS.shape[1] - k
    D, eps = config.hidden_size, config.rms_norm_eps
    final_norm = source.build(_meta(lambda: DeepseekV3RMSNorm(D, eps)), "model.norm.")
    enorm = source.build(_meta(lambda: DeepseekV3RMSNorm(D, eps)), p + "enorm.")
    hnorm = source.build(_meta(lambda: DeepseekV3RMSNorm(D, eps)), p + "hnorm.")
    eh_proj = source.build(_meta(lambda: nn.Linear(2 * D, D, bias=False)), p + "eh_proj.")
    embed = source.weight(p + "embed_tokens.weight")
    for i in range(0, ids_NS.shape[0], chunk):
        h = inp[i : i + chunk, :S].to(dev)
        if k == 1:
            h = final_norm(h)
        e = F.embedding(ids_NS[i : i + chunk, k : k + S].to(dev), embed)
        out[i : i + chunk, :S] = eh_proj(torch.cat([enorm(e), hnorm(h)], dim=-1)).cpu()


def _tensor_bytes(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        total = 0
        for name in f.keys():
            t = f.get_slice(name)
            total += int(np.prod(t.get_shape(), dtype=np.int64)) * _DTYPE_BYTES[t.get_dtype()]
        return total


_DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "F32": 4,
    "I32": 4,
    "BF16": 2,
    "F16": 2,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_DTYPE_BYTES.update({"F8_E4M3": 1, "F8_E5M2": 1})


def _shard_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return list(f.keys())
