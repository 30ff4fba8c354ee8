"""The demo model: a small DeepSeek-V3-architecture model trained on first use, so the demo's numbers (perplexity
after quantization, MTP acceptance, generated text) mean something.

    path = get_demo_model()      # trains once (about a minute on 2 cores), then returns the cached folder

The real structure in miniature: MLA with q- and kv-LoRA, the first layer dense and the rest grouped-routing MoE
(sigmoid scores, noaux_tc with the correction bias kept balanced by the auxiliary-loss-free update), one shared
expert, one MTP layer; a byte-level BPE tokenizer. It trains on `pydoc_split()`'s train text (CPython's reference
docs, on every machine, offline) for a fixed number of steps with a fixed seed, in fp32 on 2 threads, and is
written in the official layout (BF16 shards + index, config with auto_map, remote code, tokenizer, generation
config) with a `dsv3_record.json` holding the recipe and its held-out numbers. Every Linear's input dimension is
a multiple of 128, so GPTQ groups of 32, 64 and 128 all divide it.

Cached under $DSV3_CACHE (default ~/.cache/dsv3) as demo-model-<hash of the recipe and the training text>: it is
trained into a temporary folder and renamed into place, under a lock, so an interrupted or concurrent run never
leaves or reads a half-written model.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from dsv3.corpus import pydoc_split

RECORD_OPERATION = "train-demo-model"
EVAL_WINDOW = 128  # tokens per held-out window (non-overlapping); the first token of each is context only


@dataclasses.dataclass(frozen=True)
class DemoModelRecipe:
    # tokenizer
    vocab_size: int = 2048
    # model (DeepSeek-V3 field names)
    hidden_size: int = 128
    intermediate_size: int = 384
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 4  # layer 0 dense, 1-3 MoE; the MTP layer (4) is MoE too
    num_attention_heads: int = 4
    q_lora_rank: int = 128
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 32
    n_routed_experts: int = 8
    n_group: int = 4
    topk_group: int = 2
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 1
    mtp_loss_weight: float = 0.3
    # training
    # 270 steps: 0.49 CPU-seconds each (16 x 128 tokens, fp32, measured), so about 65 s on 2 quiet cores.
    steps: int = 270
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 2.5e-3  # 5e-3 diverges to perplexity ~120; 2e-3 .. 3e-3 all reach ~63-70
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    bias_update_gamma: float = 0.001
    seed: int = 0
    threads: int = 2
    # Bump when the training code changes in a way the fields above do not show, so caches are rebuilt.
    version: int = 1

    def config(self):
        from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config

        return DeepseekV3Config(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            moe_intermediate_size=self.moe_intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_nextn_predict_layers=1,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_attention_heads,
            q_lora_rank=self.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            n_routed_experts=self.n_routed_experts,
            n_group=self.n_group,
            topk_group=self.topk_group,
            num_experts_per_tok=self.num_experts_per_tok,
            n_shared_experts=self.n_shared_experts,
            routed_scaling_factor=self.routed_scaling_factor,
            first_k_dense_replace=self.first_k_dense_replace,
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            norm_topk_prob=True,
            mtp_loss_weight=self.mtp_loss_weight,
            aux_loss_alpha=0.0,  # balance comes from the bias update alone (auxiliary-loss-free)
            seq_aux=False,
            max_position_embeddings=4 * self.seq_len,
            rope_theta=10000.0,
            rope_scaling=None,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            tie_word_embeddings=False,
            initializer_range=0.02,
        )

    def digest(self, train_text: str) -> str:
        """Hash of every field and of the training text (it changes with the Python version)."""
        h = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode())
        h.update(hashlib.sha256(train_text.encode()).digest())
        return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("DSV3_CACHE") or Path.home() / ".cache" / "dsv3")


def demo_model_dir(recipe: DemoModelRecipe | None = None, cache: str | os.PathLike | None = None) -> Path:
    """Where `get_demo_model` keeps the recipe's folder (it may not exist yet); `cache` overrides $DSV3_CACHE.
    Only a finished model is ever renamed to this name."""
    root = Path(cache) if cache is not None else cache_root()
    return root / f"demo-model-{(recipe or DemoModelRecipe()).digest(pydoc_split()[0])}"


def get_demo_model(
    log: Callable[[str], None] = print,
    cache: str | os.PathLike | None = None,
    recipe: DemoModelRecipe | None = None,
) -> Path:
    """The trained demo model's folder: from the cache, or trained now (then cached). `cache` overrides
    $DSV3_CACHE."""
    recipe = recipe or DemoModelRecipe()
    final = demo_model_dir(recipe, cache)
    root = final.parent
    if _is_complete(final):
        return _refresh_remote_code(final)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{final.name}.lock", log):
        if _is_complete(final):  # another process finished it while we waited
            return _refresh_remote_code(final)
        for stale in root.glob(f".{final.name}.tmp-*"):  # left by a killed run; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # not complete and not ours to trust: rebuilt
            shutil.rmtree(final)
        tmp = root / f".{final.name}.tmp-{os.getpid()}"
        try:
            train_demo_model(tmp, recipe, log)
            os.rename(tmp, final)  # atomic: the folder appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _is_complete(folder: Path) -> bool:
    from dsv3.convert.record import read_record

    try:
        record = read_record(folder)
    except ValueError:
        return False
    return record is not None and record["operation"]["name"] == RECORD_OPERATION


def _refresh_remote_code(folder: Path) -> Path:
    # The weights do not depend on the model code, so a newer dsv3 keeps the cached weights but loads them with
    # its own remote code (each file replaced atomically, only when it differs).
    from dsv3.convert.checkpoint import REMOTE_CODE_DIR, REMOTE_CODE_FILES, copy_file_atomic

    for name in REMOTE_CODE_FILES:
        ours, theirs = REMOTE_CODE_DIR / name, folder / name
        if not theirs.is_file() or theirs.read_bytes() != ours.read_bytes():
            copy_file_atomic(ours, theirs)
    return folder


@contextlib.contextmanager
def _locked(path: Path, log: Callable[[str], None]) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is training the demo model ({path})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------------------------------------ training
def build_model(recipe: DemoModelRecipe):
    """The initial model, deterministic in recipe.seed. As in the DeepSeek-V3 report the MTP module shares the
    main model's embedding and output head while training; `untie_mtp` makes them the separate tensors the
    official layout stores."""
    from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3ForCausalLM

    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(recipe.seed)
        model = DeepseekV3ForCausalLM(recipe.config()).float()
    tie_mtp(model)
    return model


def tie_mtp(model) -> None:
    """The MTP modules share the main model's embedding and output head (training, as in the report)."""
    for mtp in model.model.mtp_layers:
        mtp.embed_tokens.weight = model.model.embed_tokens.weight
        mtp.shared_head.head.weight = model.lm_head.weight


def untie_mtp(model) -> None:
    """Separate copies again, as the official layout stores them (before saving)."""
    for mtp in model.model.mtp_layers:
        mtp.embed_tokens.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        mtp.shared_head.head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())


def encode(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: the whole text is longer than model_max_length on purpose (it is cut into windows).
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False).input_ids, dtype=torch.long)


def _lr_factor(recipe: DemoModelRecipe, step: int) -> float:
    # Linear warm-up, then cosine from 1 down to min_lr_ratio at the last step.
    warm = min(1.0, (step + 1) / max(1, recipe.warmup_steps))
    progress = min(1.0, step / max(1, recipe.steps - 1))
    return warm * (recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_steps(model, train_ids: torch.Tensor, recipe: DemoModelRecipe, log: Callable[[str], None]) -> dict:
    """Trains `model` in place for recipe.steps steps; returns the timing."""
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(recipe, s))
    gen = torch.Generator().manual_seed(recipe.seed)
    T = recipe.seq_len
    t0, cpu0 = time.perf_counter(), time.process_time()
    every = max(1, recipe.steps // 6)
    for step in range(recipe.steps):
        starts = torch.randint(0, len(train_ids) - T, (recipe.batch_size,), generator=gen)
        ids_BT = torch.stack([train_ids[s : s + T] for s in starts.tolist()])
        out = model(ids_BT, labels=ids_BT)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        model.update_expert_bias(recipe.bias_update_gamma)  # from the loads this step's forward counted
        if (step + 1) % every == 0 or step == recipe.steps - 1:
            elapsed = time.perf_counter() - t0
            log(
                f"  step {step + 1:4d}/{recipe.steps}  lm {out.lm_loss.item():.3f}  mtp {out.mtp_loss.item():.3f}"
                f"  {(step + 1) * recipe.batch_size / elapsed:.1f} samples/s"
            )
    seconds = time.perf_counter() - t0
    model.eval()
    return {
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(time.process_time() - cpu0, 2),
        "samples_per_second": round(recipe.steps * recipe.batch_size / seconds, 2),
    }


# ----------------------------------------------------------------------------------------------- evaluation
def _windows(tokenizer, text: str, max_tokens: int, window: int) -> torch.Tensor:
    ids = encode(tokenizer, text)
    n = min(len(ids), max_tokens) // window
    if n == 0:
        raise ValueError(f"held-out text: {len(ids)} tokens, fewer than one window of {window}")
    return ids[: n * window].view(n, window)


@torch.no_grad()
def heldout_perplexity(
    model, tokenizer, text: str, max_tokens: int = 16384, window: int = EVAL_WINDOW, batch: int = 8
) -> float:
    """exp(mean next-token loss) over non-overlapping windows of `window` tokens (the first `max_tokens` of
    `text`). The lm loss only: `loss` would add the MTP term."""
    windows_NW = _windows(tokenizer, text, max_tokens, window).to(model.device)
    nll, count = 0.0, 0
    for ids_BW in windows_NW.split(batch):
        nll += _next_token_nll(model(ids_BW, use_cache=False).logits, ids_BW)
        count += ids_BW[:, 1:].numel()
    return math.exp(nll / count)


def _next_token_nll(logits_BWV: torch.Tensor, ids_BW: torch.Tensor) -> float:
    # Summed over the window's targets; any causal LM's logits (ours, transformers' native, quantized).
    logits = logits_BWV[:, :-1].float().flatten(0, 1)
    return torch.nn.functional.cross_entropy(logits, ids_BW[:, 1:].flatten(), reduction="sum").item()


@torch.no_grad()
def heldout_metrics(
    model, tokenizer, text: str, max_tokens: int = 16384, window: int = EVAL_WINDOW, batch: int = 8
) -> dict:
    """Perplexity, and the MTP head against the main head on the same windows:
    - mtp_agreement: at position i the MTP head (fed h_i and the true t_{i+1}) predicts t_{i+2}; the main model
      predicts t_{i+2} from the true prefix at position i + 1. The fraction of positions where the two argmaxes
      agree is what greedy speculative decoding with the MTP draft accepts.
    - mtp_accuracy: the MTP head's argmax equals the true t_{i+2}."""
    windows_NW = _windows(tokenizer, text, max_tokens, window).to(model.device)
    nll = count = agree = hits = pairs = 0
    for ids_BW in windows_NW.split(batch):
        out = model(ids_BW, use_cache=False, output_mtp_logits=True)
        nll += _next_token_nll(out.logits, ids_BW)
        count += ids_BW[:, 1:].numel()
        draft_BW = out.mtp_logits[0].argmax(-1)  # (B, W-1): position i predicts t_{i+2}
        main_BW = out.logits[:, 1:].argmax(-1)  # (B, W-1): position i+1 predicts t_{i+2}
        agree += (draft_BW == main_BW).sum().item()
        hits += (draft_BW[:, :-1] == ids_BW[:, 2:]).sum().item()
        pairs += ids_BW[:, 2:].numel()
    return {
        "heldout_ppl": math.exp(nll / count),
        "mtp_agreement": agree / count,
        "mtp_accuracy": hits / pairs,
        "heldout_tokens": count,
    }


def unigram_perplexity(train_ids: torch.Tensor, windows_NW: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of token frequencies (add-one smoothed, from the training ids) on the same targets the model
    is scored on: every window's tokens after the first."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[windows_NW[:, 1:].flatten()].mean().item())


def _round_to_bf16(model) -> None:
    # The folder holds BF16 weights: score exactly what a user will load (the fp32 master is not kept).
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() and t.dtype == torch.float32:
                t.copy_(t.bfloat16().float())


# ---------------------------------------------------------------------------------------------- the recipe
def train_demo_model(
    out: str | os.PathLike, recipe: DemoModelRecipe | None = None, log: Callable[[str], None] = print
) -> dict:
    """Tokenizer, training, evaluation and the official-layout folder at `out` (created; must not exist).
    Returns the results written into the record."""
    from dsv3.convert.checkpoint import atomic_write_json
    from dsv3.convert.record import new_record, now, write_record
    from dsv3.convert.tiny import train_bpe_tokenizer, write_official_layout

    recipe = recipe or DemoModelRecipe()
    out = Path(out)
    out.mkdir(parents=True)
    started, t0 = now(), time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(min(recipe.threads, os.cpu_count() or 1))
    try:
        train_text, heldout_text = pydoc_split()
        tokenizer = train_bpe_tokenizer([train_text], recipe.vocab_size, model_max_length=4 * recipe.seq_len)
        train_ids = encode(tokenizer, train_text)
        model = build_model(recipe)
        n_params = sum(p.numel() for p in model.parameters())  # the MTP module's shared tensors counted once
        log(
            f"training the demo model ({n_params / 1e6:.1f}M parameters, {recipe.steps} steps x "
            f"{recipe.batch_size} x {recipe.seq_len} tokens, {len(train_ids):,} training tokens of CPython's "
            f"reference docs) on {recipe.threads} threads; cached after this run"
        )
        timing = train_steps(model, train_ids, recipe, log)
        untie_mtp(model)
        _round_to_bf16(model)
        metrics = heldout_metrics(model, tokenizer, heldout_text)
        windows = _windows(tokenizer, heldout_text, 16384, EVAL_WINDOW)
        results = {
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
            "unigram_ppl": round(unigram_perplexity(train_ids, windows, recipe.vocab_size), 2),
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_tokens": len(train_ids),
            **timing,
        }
        write_official_layout(model, out, torch.bfloat16)
        tokenizer.save_pretrained(out)
        atomic_write_json(
            out / "generation_config.json",
            {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2, "do_sample": False},
        )
        params = {
            **dataclasses.asdict(recipe),
            "data": "pydoc_split() train text",
            "torch": torch.__version__,
        }
        write_record(out, new_record(None, RECORD_OPERATION, params, results, started=started))
        log(
            f"demo model trained in {timing['train_seconds']:.0f}s ({timing['samples_per_second']:.1f} samples/s): "
            f"held-out perplexity {results['heldout_ppl']:.1f} (unigram {results['unigram_ppl']:.0f}), MTP "
            f"agreement with the main head {results['mtp_agreement']:.0%}; total {time.perf_counter() - t0:.0f}s"
        )
        return results
    finally:
        torch.set_num_threads(threads)
