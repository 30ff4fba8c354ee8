# Routed experts without host synchronisation: one grouped matmul per projection over all experts, with the
# group boundaries (tokens per expert) kept as a tensor. No .tolist()/.nonzero() per layer per step, so a GPU never
# waits for the host and torch.compile traces the whole MoE block without graph breaks.
#
# The per-expert modules stay the parameters (DESIGN.md's state-dict contract: PEFT, GPTQ and the quantized linears
# hook into model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj). The grouped matmul needs all experts' weights
# in one (E, out, in) tensor, so the experts' weights are made *views* into one stacked storage per projection: the
# same bytes, no second copy. Stacking happens lazily, one projection at a time (peak: one projection of one layer
# extra), the first time a layer runs this path, and again whenever something replaced the experts' storage
# (.to(), load_state_dict(assign=True), ...): every call checks that each expert's weight still points where the
# stack expects it. In-place updates (optimizer steps, load_state_dict, copy_) write through the views and need
# nothing. save_pretrained clones views that share a storage before writing (transformers' rule for
# disjoint shared tensors), so checkpoints are unchanged. When the experts' weights were zero-copy views of a
# mapped shard, the pages they occupied in the mapping are released after the copy (drop_file_pages): the file is
# untouched, and only the stack stays resident.
#
# The grouped path is taken only when it computes exactly what the per-expert modules would: every expert
# projection a plain bias-free nn.Linear with no hooks (GPTQ calibration and PEFT see their modules called), no
# gradient needed (training keeps the per-expert loop), and torch offers the grouped matmul.
#
# Shapes: M tokens, D hidden, I moe_intermediate_size, E routed experts, K experts per token, P = M * K pairs.
import ctypes
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from .row_linear import materialized

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_TORCH_GROUPED_MM = getattr(torch, "_grouped_mm", None)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mlp_impl(
    x_PD: torch.Tensor,
    gate_EID: torch.Tensor,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    offs_E: torch.Tensor,
) -> torch.Tensor:
    # Rows offs[e-1]:offs[e] of x through expert e: down(silu(gate(x)) * up(x)). On GPUs torch's grouped kernel
    # (the offsets stay on the device). On CPUs the offsets already live in host memory, so reading them costs no
    # synchronisation: each expert that has tokens runs exactly the operations of DeepseekV3MLP.forward on its rows
    # (bit for bit the per-expert modules' result, in every dtype), which also beats torch's CPU grouped kernel
    # (it runs a matmul for every expert, empty ones included).
    if x_PD.device.type != "cpu" and x_PD.dtype in _KERNEL_DTYPES and _TORCH_GROUPED_MM is not None:
        gate_PI = _TORCH_GROUPED_MM(x_PD, gate_EID.transpose(1, 2), offs=offs_E)
        up_PI = _TORCH_GROUPED_MM(x_PD, up_EID.transpose(1, 2), offs=offs_E)
        return _TORCH_GROUPED_MM(F.silu(gate_PI) * up_PI, down_EDI.transpose(1, 2), offs=offs_E)
    out = x_PD.new_empty(x_PD.shape[0], down_EDI.shape[1])
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            x = x_PD[start:end]
            out[start:end] = F.linear(F.silu(F.linear(x, gate_EID[e])) * F.linear(x, up_EID[e]), down_EDI[e])
        start = end
    return out


def _grouped_mlp_fake(x_PD, gate_EID, up_EID, down_EDI, offs_E) -> torch.Tensor:
    return x_PD.new_empty(x_PD.shape[0], down_EDI.shape[1])


def _register_grouped_mlp():
    # A custom op, so that torch.compile treats the grouped expert MLP as one opaque call (no graph break for the
    # host loop; torch's own fake-tensor rule for _grouped_mm only admits bf16, a CUDA restriction). This file may be
    # imported twice (as dsv3.modeling_deepseek and as a checkpoint's remote code): the op is defined once.
    if not hasattr(torch, "library") or not hasattr(torch.library, "custom_op"):
        return None
    try:
        return torch.ops.dsv3_moe.grouped_mlp.default
    except (AttributeError, RuntimeError):
        pass
    op = torch.library.custom_op("dsv3_moe::grouped_mlp", mutates_args=())(_grouped_mlp_impl)
    op.register_fake(_grouped_mlp_fake)
    return op


_GROUPED_MLP = _register_grouped_mlp()


class ExpertStack:
    """The stacked weights of one MoE block: (gate (E, I, D), up (E, I, D), down (E, D, I)) and, to check that the
    experts still view them, the data pointer each expert's weight must have."""

    def __init__(self, stacks: list[torch.Tensor]) -> None:
        self.stacks = stacks
        self.expected = [
            [s.data_ptr() + e * s.stride(0) * s.element_size() for e in range(s.shape[0])] for s in stacks
        ]


def _global_hooks() -> bool:
    module = torch.nn.modules.module
    return bool(
        getattr(module, "_global_forward_hooks", None) or getattr(module, "_global_forward_pre_hooks", None)
    )


def _plain_weights(experts: nn.ModuleList, expert_class: type) -> list[list[torch.Tensor]] | None:
    """Per projection, every expert's weight; None unless every expert is an `expert_class` of bias-free
    nn.Linear projections without hooks (module dicts read directly: this runs per layer per step)."""
    weights: list[list[torch.Tensor]] = [[] for _ in PROJECTIONS]
    for expert in experts:
        if type(expert) is not expert_class or expert._forward_hooks or expert._forward_pre_hooks:
            return None
        for j, name in enumerate(PROJECTIONS):
            linear = expert._modules[name]
            if type(linear) is not nn.Linear or linear._forward_hooks or linear._forward_pre_hooks:
                return None
            if linear._parameters["bias"] is not None:
                return None
            weights[j].append(linear._parameters["weight"])
    return weights


_MADV_DONTNEED = 4  # Linux


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)  # the C library the process already uses
    except OSError:
        return None


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's file-backed memory mappings; [] where there is no /proc (not Linux)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5].rstrip("\n")))
    return out


def _unmodified_page_runs(a: int, b: int, page: int) -> list[tuple[int, int]]:
    # The runs of pages in [a, b) that still show the file: not private copies made by a write (present pages that
    # are not file pages, or swapped-out ones), per /proc/self/pagemap. Nothing when it cannot be read.
    n = (b - a) // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(a // page * 8)
            raw = f.read(n * 8)
    except OSError:
        return []
    if len(raw) != n * 8:
        return []
    flags = torch.frombuffer(bytearray(raw), dtype=torch.int64)
    present, swapped, file_page = flags < 0, (flags >> 62) & 1 == 1, (flags >> 61) & 1 == 1
    keep = torch.cat([torch.tensor([False]), ~((present & ~file_page) | swapped), torch.tensor([False])])
    edges = (keep[1:] != keep[:-1]).nonzero().flatten().tolist()  # alternating run starts and ends
    return [(a + lo * page, a + hi * page) for lo, hi in zip(edges[::2], edges[1::2], strict=True)]


def drop_file_pages(spans: list[tuple[int, int]], mappings: list[tuple[int, int, str]] | None = None) -> int:
    """Tell the kernel this process no longer needs the whole pages inside each (start, end) byte span, where the
    span lies in a file-backed mapping (checked against /proc/self/maps: never anonymous memory, which this would
    zero) and the page still shows the file (a page some write turned into a private copy is kept). Any later
    read faults the file's bytes back in, so this only stops counting pages nobody reads any more (a shard's copy
    of expert weights that now live in a stack). Returns the bytes released; 0 where madvise is unavailable."""
    mappings = file_mappings() if mappings is None else mappings
    libc = _libc()
    madvise = getattr(libc, "madvise", None) if libc is not None else None
    if madvise is None or not mappings:
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = os.sysconf("SC_PAGE_SIZE")
    released = 0
    for lo, hi in spans:
        a, b = -(-lo // page) * page, hi // page * page
        if b > a and any(start <= a and b <= end for start, end, _ in mappings):
            for run_a, run_b in _unmodified_page_runs(a, b, page):
                if madvise(run_a, run_b - run_a, _MADV_DONTNEED) == 0:
                    released += run_b - run_a
    return released


def _release_freed_heap() -> None:
    # The experts' old storages were freed, but glibc keeps freed heap pages in the process (RSS) unless asked to
    # return them; without this the stack would look like a second copy. A no-op where there is no glibc.
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def expert_stack(owner: nn.Module, experts: nn.ModuleList, expert_class: type) -> ExpertStack | None:
    """The stacked weights for the grouped path, or None when it must not be taken (see the top of this file).
    Cached on `owner` as a plain attribute (never saved); rebuilt when any expert's weight no longer views it."""
    if _GROUPED_MLP is None or torch.is_grad_enabled() or _global_hooks():
        return None
    weights = _plain_weights(experts, expert_class)
    if weights is None:
        return None
    stack = getattr(owner, "_expert_stack", None)
    if torch.compiler.is_compiling():
        return stack  # as built by an eager run (re-pointing parameters and pointer checks cannot be traced)
    if stack is not None and all(
        [w.data_ptr() for w in ws] == stack.expected[j] for j, ws in enumerate(weights)
    ):
        return stack
    if any(w.is_meta for ws in weights for w in ws):
        return None  # offloaded: accelerate brings the weights in per expert module
    with torch.no_grad():
        stacks, mappings = [], None  # /proc/self/maps read once per stack, and only if a weight is mapped
        for ws in weights:  # one projection at a time: the transient extra memory is one (E, out, in)
            stacked = torch.empty((len(ws), *ws[0].shape), dtype=ws[0].dtype, device=ws[0].device)
            # Weights that are zero-copy views of a mapped shard (transformers loads so when dtypes match): their
            # pages stay mapped after the copy below, counted in RSS beside the stack, unless released.
            mapped = [
                (w.data_ptr(), w.data_ptr() + w.nbytes)
                for w in ws
                if w.device.type == "cpu" and not w.untyped_storage().resizable()
            ]
            for e, w in enumerate(ws):
                stacked[e].copy_(w)
                w.data = stacked[e]  # same Parameter object (optimizers, PEFT keep their references)
            stacks.append(stacked)
            del w
            if mapped:
                mappings = file_mappings() if mappings is None else mappings
                drop_file_pages(mapped, mappings)
            _release_freed_heap()
    owner._expert_stack = ExpertStack(stacks)
    return owner._expert_stack


def grouped_experts(
    stack: ExpertStack, x_MD: torch.Tensor, idx_MK: torch.Tensor, weight_MK: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_k weight[m, k] * expert_{idx[m, k]}(x[m]) for every token, accumulated in fp32; also the tokens per
    expert (E,). All on tensors: the group offsets never leave the device."""
    gate_EID, up_EID, down_EDI = stack.stacks
    M, K = idx_MK.shape
    E = gate_EID.shape[0]
    flat_P = idx_MK.flatten()
    # scatter_add, not bincount: the output shape must not depend on the data (torch.compile).
    counts_E = torch.zeros(E, dtype=torch.long, device=flat_P.device).scatter_add_(
        0, flat_P, torch.ones_like(flat_P)
    )
    if torch.compiler.is_compiling() and x_MD.device.type == "cpu" and M * K <= E:
        return _gathered_experts(stack, x_MD, idx_MK, weight_MK), counts_E
    order_P = flat_P.argsort(stable=True)  # pairs sorted by expert
    token_P = order_P // K
    offs_E = counts_E.cumsum(0).to(torch.int32)  # end of each expert's group
    x_PD = x_MD[token_P].to(gate_EID.dtype)
    # The custom op only matters to torch.compile; eager calls skip its dispatch (~80 us per layer per step).
    grouped_mlp = _GROUPED_MLP if torch.compiler.is_compiling() else _grouped_mlp_impl
    y_PD = grouped_mlp(x_PD, gate_EID, up_EID, down_EDI, offs_E)
    y_PD = y_PD.float() * weight_MK.flatten()[order_P, None]
    y_MD = torch.zeros(M, x_MD.shape[-1], dtype=torch.float32, device=x_MD.device)
    return y_MD.index_add(0, token_P, y_PD).to(x_MD.dtype), counts_E


def _gathered_experts(
    stack: ExpertStack, x_MD: torch.Tensor, idx_MK: torch.Tensor, weight_MK: torch.Tensor
) -> torch.Tensor:
    # grouped_experts for a few (token, expert) pairs (at most E: decode) inside a torch.compile'd graph on a CPU.
    # Each projection is written as the selected expert's weight times the token, reduced over the input dimension:
    # inductor generates one loop that reads each selected weight row straight from the stack (no gathered copy)
    # and accumulates in fp32, in place of a host loop of three external matmuls per expert. Per MoE layer of the
    # decode benchmark (16 experts 256 x 512, 4 pairs, 2 threads): 95 us against 557 us in bf16, 165 us against
    # 329 us in fp32. Same arithmetic as the per-expert modules (fp32 sums, one rounding per projection), summed
    # in another order: equal to rounding.
    gate_EID, up_EID, down_EDI = stack.stacks
    dtype = gate_EID.dtype
    x_M11D = materialized(x_MD.to(dtype)).float()[:, None, None, :]
    gate_MKI = (gate_EID[idx_MK].float() * x_M11D).sum(-1).to(dtype)
    up_MKI = (up_EID[idx_MK].float() * x_M11D).sum(-1).to(dtype)
    h_MK1I = (F.silu(gate_MKI) * up_MKI).float()[:, :, None, :]
    y_MKD = (down_EDI[idx_MK].float() * h_MK1I).sum(-1).to(dtype)
    return (y_MKD.float() * weight_MK[..., None].float()).sum(1).to(x_MD.dtype)
