"""PEFT LoRA on the official per-expert layout: every expert, shared expert and dense MLP gets an adapter."""

import json

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TARGETS = [
    "q_a_proj",
    "q_b_proj",
    "kv_a_proj_with_mqa",
    "kv_b_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)


def _expected_lora_modules(config) -> set[str]:
    names = set()
    for i in range(config.num_hidden_layers + config.num_nextn_predict_layers):
        prefix = f"base_model.model.model.layers.{i}"
        names |= {f"{prefix}.self_attn.{p}" for p in TARGETS[:5]}
        if config.is_moe_layer(i):
            mlps = [f"mlp.experts.{e}" for e in range(config.n_routed_experts)] + ["mlp.shared_experts"]
        else:
            mlps = ["mlp"]
        names |= {f"{prefix}.{m}.{p}" for m in mlps for p in ("gate_proj", "up_proj", "down_proj")}
    return names


def test_lora_adapts_every_expert_trains_saves_reloads_and_merges(tiny_ckpt, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    path = tiny_ckpt("v3")
    model = get_peft_model(_load(path), LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS)))
    cfg = model.config
    lora = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert lora == _expected_lora_modules(cfg)
    assert sum(".mlp.experts." in n for n in lora) == 3 * cfg.n_routed_experts * 3  # 2 MoE layers + MTP: 144
    assert model.peft_config["default"].target_parameters in (None, set(), [])  # no fused-expert rewrite
    assert cfg.to_dict()["model_type"] == "deepseek_v3"  # what any save writes

    ids = torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for step in range(4):
        loss = model(ids, labels=ids).loss
        loss.backward()
        if step == 0:
            # lora_B starts at zero, so its gradient is the first to show; routed experts must get one.
            expert_b = {n: p.grad for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n}
            hit = sum(g is not None and g.abs().sum() > 0 for g in expert_b.values())
            assert hit >= len(expert_b) // 2, (hit, len(expert_b))
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    moved = [
        n for n, p in model.named_parameters() if ".experts." in n and "lora_B" in n and p.abs().sum() > 0
    ]
    assert len(moved) >= 3 * cfg.n_routed_experts * 3 // 2

    model.eval()
    with torch.no_grad():
        adapted = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(TARGETS)

    reloaded = PeftModel.from_pretrained(_load(path), tmp_path / "adapter").eval()
    assert {n for n, m in reloaded.named_modules() if hasattr(m, "lora_A")} == lora
    with torch.no_grad():
        assert (reloaded(ids).logits - adapted).abs().max().item() <= 1e-5
        base = _load(path).eval()(ids).logits
        assert (base - adapted).abs().max().item() > 1e-3  # the adapter does change the model
        merged = reloaded.merge_and_unload()
        assert not any(hasattr(m, "lora_A") for m in merged.modules())
        assert (merged(ids).logits - adapted).abs().max().item() <= 1e-4
    # The merged model saves as an ordinary checkpoint, still interchangeable with the official configs.
    merged.save_pretrained(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "deepseek_v3"
    assert AutoConfig.from_pretrained(tmp_path / "merged", trust_remote_code=True).model_type == "deepseek_v3"
    with torch.no_grad():
        assert (_load(tmp_path / "merged").eval()(ids).logits - adapted).abs().max().item() <= 1e-4
