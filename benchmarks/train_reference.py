"""Train the small reference model: DeepSeek-V3 architecture (MLA, grouped-routing MoE with a shared expert, one
MTP layer), byte-level BPE tokenizer, on ../shared/data/text (wikitext-2 valid + tiny-shakespeare; wikitext-2
test held out). fp32 on CPU.

    bash scripts/bench.sh train_reference          # trains (if not cached) and prints the report

Two runs with identical data order and initialisation, the auxiliary-loss-free bias update on and off; the run
with the update is saved (our remote code, tokenizer, config) to $DSV3_CACHE/reference-model (default
~/.cache/dsv3/reference-model) and reused by every benchmark that calls get_reference_model().
Reports held-out perplexity vs the unigram baseline of the same tokenizer, MTP-head accuracy on t+2 vs chance
and vs always guessing the most frequent token, and max/mean expert load with and without the bias update.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv3.modeling_deepseek.configuration_deepseek import DeepseekV3Config  # noqa: E402
from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3ForCausalLM  # noqa: E402

from dsv3.demo_model import tie_mtp, untie_mtp  # noqa: E402
from dsv3.training import load_imbalance  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "text"
TRAIN_FILES = ("wikitext2_valid.txt", "tinyshakespeare.txt")
TEST_FILE = "wikitext2_test.txt"
VOCAB = 4096
SEQ = 128
RECIPE_VERSION = 1  # bump when the recipe changes, so cached models are rebuilt

CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_nextn_predict_layers=1,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=16,
    routed_scaling_factor=2.5,
    kv_lora_rank=64,
    q_lora_rank=128,
    qk_rope_head_dim=32,
    v_head_dim=32,
    qk_nope_head_dim=32,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    first_k_dense_replace=1,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    rope_scaling=None,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    initializer_range=0.02,
    aux_loss_alpha=0.0,
    seq_aux=False,
    mtp_loss_weight=0.3,
)


def cache_dir() -> Path:
    return Path(os.environ.get("DSV3_CACHE", Path.home() / ".cache" / "dsv3"))


def _read(name: str) -> str:
    path = DATA / name
    if not path.is_file():
        raise SystemExit(f"Error: {path} not found (the recipe trains on ../shared/data/text)")
    return path.read_text()


def train_tokenizer(texts: list[str]):
    from dsv3.convert.tiny import train_bpe_tokenizer

    return train_bpe_tokenizer(texts, VOCAB, model_max_length=2048)


def encode(tokenizer, text: str) -> torch.Tensor:
    lines = [line for line in text.splitlines() if line.strip()]
    ids = tokenizer(lines, add_special_tokens=False)["input_ids"]
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return torch.tensor([t for line in ids for t in (*line, *nl)], dtype=torch.long)


def build_model(seed: int) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**CONFIG)).float()
    # The report shares the embedding and output head between the main model and the MTP module; on disk they
    # are physical copies (model.layers.L.embed_tokens / shared_head.head), restored by untie_mtp before saving.
    tie_mtp(model)
    return model


def train(
    train_ids: torch.Tensor, steps: int, batch: int, gamma: float, seed: int, log
) -> DeepseekV3ForCausalLM:
    model = build_model(seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        ),
    )
    gen = torch.Generator().manual_seed(seed)  # same batches for both runs
    t0 = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - SEQ - 1, (batch,), generator=gen)
        ids = torch.stack([train_ids[s : s + SEQ] for s in starts.tolist()])
        out = model(ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if gamma > 0:
            model.update_expert_bias(gamma)
        else:
            model.reset_expert_load()
        if step % 100 == 0 or step == steps - 1:
            log(
                f"  step {step:5d}  lm {out.lm_loss.item():.3f}  mtp {out.mtp_loss.item():.3f}  "
                f"{(time.perf_counter() - t0) / (step + 1):.2f}s/step"
            )
    untie_mtp(model)
    return model.eval()


@torch.no_grad()
def evaluate(model: DeepseekV3ForCausalLM, test_ids: torch.Tensor, max_tokens: int) -> dict:
    n = min(len(test_ids), max_tokens) // SEQ * SEQ
    chunks = test_ids[:n].view(-1, SEQ)
    model.reset_expert_load()
    nll, mtp_hits, mtp_total, count = 0.0, 0, 0, 0
    for i in range(0, len(chunks), 16):
        ids = chunks[i : i + 16]
        with model.measuring_expert_load():  # eval forwards are not counted unless asked for
            out = model(ids, labels=ids)
        tokens = ids[:, 1:].numel()
        nll += out.lm_loss.item() * tokens
        count += tokens
        pred = out.mtp_logits[0][:, :-1].argmax(-1)  # MTP at position i predicts token i + 2
        mtp_hits += (pred == ids[:, 2:]).sum().item()
        mtp_total += ids[:, 2:].numel()
    return {
        "ppl": math.exp(nll / count),
        "mtp_acc": mtp_hits / mtp_total,
        "load_imbalance": load_imbalance(model.expert_load()),
    }


def unigram_ppl(train_ids: torch.Tensor, test_ids: torch.Tensor) -> tuple[float, float]:
    counts = torch.bincount(train_ids, minlength=VOCAB).double() + 1.0  # add-one smoothing
    logp = (counts / counts.sum()).log()
    top = torch.bincount(test_ids, minlength=VOCAB).max().item() / len(test_ids)
    return math.exp(-logp[test_ids].mean().item()), top


def get_reference_model(steps: int = 1200, batch: int = 16, log=print) -> Path:
    """The trained reference checkpoint folder, trained once and cached (see module docstring)."""
    out = cache_dir() / "reference-model"
    meta = out / "dsv3-reference.json"
    if meta.is_file() and json.loads(meta.read_text()).get("recipe") == RECIPE_VERSION:
        return out
    run(steps, batch, log)
    return out


def run(steps: int, batch: int, log=print) -> dict:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    train_text = "\n".join(_read(n) for n in TRAIN_FILES)
    tokenizer = train_tokenizer([train_text])
    train_ids, test_ids = encode(tokenizer, train_text), encode(tokenizer, _read(TEST_FILE))
    log(
        f"tokenizer: byte-level BPE, {len(tokenizer)} tokens; train {len(train_ids):,} tokens, "
        f"held-out wikitext-2 test {len(test_ids):,} tokens"
    )
    results = {}
    for name, gamma in (("bias update on (gamma 0.001)", 0.001), ("bias update off", 0.0)):
        log(f"training, {name}: {steps} steps x {batch} x {SEQ} tokens")
        model = train(train_ids, steps, batch, gamma, seed=0, log=log)
        results[name] = evaluate(model, test_ids, max_tokens=200_000)
        if gamma > 0:
            out = cache_dir() / "reference-model"
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            (out / "dsv3-reference.json").write_text(json.dumps({"recipe": RECIPE_VERSION, **results[name]}))
            log(f"saved -> {out}")
    uni_ppl, top_freq = unigram_ppl(train_ids, test_ids)
    on, off = results["bias update on (gamma 0.001)"], results["bias update off"]
    n_params = sum(p.numel() for p in model.parameters())
    log(f"\nreference model: {n_params:,} parameters, trained in {(time.perf_counter() - t0) / 60:.1f} min\n")
    log("| metric (held-out wikitext-2 test) | reference model | baseline | ratio |\n|---|---|---|---|")
    log(
        f"| perplexity vs unigram (same tokenizer) | {on['ppl']:.1f} | {uni_ppl:.1f} | {on['ppl'] / uni_ppl:.2f} |"
    )
    log(
        f"| MTP head top-1 on token t+2 vs chance 1/V | {on['mtp_acc']:.3f} | {1 / len(tokenizer):.5f} | "
        f"{on['mtp_acc'] * len(tokenizer):.0f}x |"
    )
    log(
        f"| MTP head top-1 vs most frequent token | {on['mtp_acc']:.3f} | {top_freq:.3f} | "
        f"{on['mtp_acc'] / top_freq:.2f}x |"
    )
    log(
        f"| expert load max/mean, bias update on vs off | {on['load_imbalance']:.2f} | "
        f"{off['load_imbalance']:.2f} | {on['load_imbalance'] / off['load_imbalance']:.2f} |"
    )
    log(f"| perplexity, bias update off (same data, same init) | {off['ppl']:.1f} | | |")
    return {"with_bias_update": on, "without_bias_update": off, "unigram_ppl": uni_ppl, "top_freq": top_freq}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    run(args.steps, args.batch)


if __name__ == "__main__":
    main()
