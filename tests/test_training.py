"""Training: aux loss, expert load statistics, auxiliary-loss-free bias update (plain loop and Trainer)."""

import torch

from convert.tiny import random_tiny_model
from dsv3.training import ExpertBiasUpdateCallback, load_imbalance


def test_expert_load_counts_every_routed_token():
    model = random_tiny_model("v3", seed=1)
    model.reset_expert_load()
    with torch.no_grad():
        model(torch.randint(3, 512, (2, 9)), labels=torch.randint(3, 512, (2, 9)))
    load = model.expert_load()
    assert sorted(load) == [1, 2, 3]  # the two MoE layers and the MTP layer's MoE
    K = model.config.num_experts_per_tok
    assert load[1].sum().item() == 2 * 9 * K and load[3].sum().item() == 2 * 8 * K  # MTP sees S - 1 positions
    model.reset_expert_load()
    assert all(t.sum() == 0 for t in model.expert_load().values())


def _skew(model, batches, strength=2.0):
    # Make expert 0 of every router attractive to most tokens: add the mean direction of the router's actual
    # inputs to its row (a router that learned one popular expert).
    inputs = {}
    hooks = [
        r.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, []).append(a[0]))
        for i, r in model.routers().items()
    ]
    with torch.no_grad():
        for ids in batches:
            model(ids, output_mtp_logits=True)  # runs the MTP layer (and its router) too
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, router in model.routers().items():
            mean = torch.cat(inputs[i]).mean(0)
            router.weight[0] += strength * mean / mean.norm() ** 2


def test_bias_update_moves_load_towards_uniform_on_a_skewed_router():
    model = random_tiny_model("v3", seed=2)
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randint(3, 512, (4, 16), generator=gen) for _ in range(6)]
    _skew(model, batches)

    def imbalance():
        model.reset_expert_load()
        with torch.no_grad():
            for ids in batches:
                model(ids, output_mtp_logits=True)  # runs the MTP layer (and its router) too
        return load_imbalance(model.expert_load())

    before = imbalance()
    bias_before = model.routers()[1].e_score_correction_bias.clone()
    for step in range(60):
        model.reset_expert_load()
        with torch.no_grad():
            model(batches[step % len(batches)], output_mtp_logits=True)
        model.update_expert_bias(gamma=0.01)
    after = imbalance()
    assert before > 2.5 and after < 0.6 * before, (before, after)
    bias = model.routers()[1].e_score_correction_bias
    assert bias[0] < bias_before[0]  # the overloaded expert was pushed down
    # the bias only selects: routing weights are still the normalised unbiased scores
    x = torch.randn(5, 256)
    idx, w, scores = model.routers()[1](x)
    chosen = scores.gather(1, idx)
    assert torch.allclose(w, chosen / chosen.sum(-1, keepdim=True) * model.config.routed_scaling_factor)


def test_sequence_aux_loss_follows_the_report_and_trains_the_router():
    model = random_tiny_model("v3", seed=4).train()
    model.config.aux_loss_alpha = 0.01
    for moe in model._moe_blocks():
        moe.aux_loss_alpha = 0.01
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(5))
    out = model(ids, labels=ids)
    moe = model.model.layers[1].mlp
    # Reference for layer 1 from its own router output on the same input, written per sequence.
    h = model.model.embed_tokens(ids)
    layer0 = model.model.layers[0]
    rope = model.model.rotary_emb(torch.arange(10)[None].expand(2, 10))
    from modeling_deepseek.modeling_deepseek import attention_mask_4d

    h = layer0(h, rope, attention_mask_4d(None, 2, 10, 0, h.device))
    x = model.model.layers[1].self_attn(
        model.model.layers[1].input_layernorm(h), rope, attention_mask_4d(None, 2, 10, 0, h.device)
    )
    x = model.model.layers[1].post_attention_layernorm(h + x)
    idx, _, s = moe.gate(x.reshape(-1, 256))
    E, K = 16, 4
    ref = 0.0
    for b in range(2):
        sb, ib = s.view(2, 10, E)[b], idx.view(2, 10, K)[b]
        f = torch.stack([(ib == e).sum() for e in range(E)]).float() * E / (K * 10)
        p = (sb / sb.sum(-1, keepdim=True)).mean(0)
        ref += 0.01 * (f * p).sum() / 2
    assert abs(moe.aux_loss.item() - ref.item()) < 1e-5
    assert abs(out.loss.item() - (out.lm_loss + 0.3 * out.mtp_loss + out.aux_loss).item()) < 1e-5
    out.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids, labels=ids).aux_loss is None  # a training term only


def test_trainer_runs_with_mtp_loss_and_bias_update_callback(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = random_tiny_model("v3", seed=6).train()
    gen = torch.Generator().manual_seed(7)
    data = [{"input_ids": (t := torch.randint(3, 512, (12,), generator=gen)), "labels": t} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    bias_before = model.routers()[1].e_score_correction_bias.clone()
    weight_before = model.model.layers[3].eh_proj.weight.detach().clone()
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[ExpertBiasUpdateCallback(gamma=0.01)]
    )
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    moved = (model.routers()[1].e_score_correction_bias - bias_before).abs()
    assert torch.allclose(moved[moved > 0], torch.tensor(0.03), atol=1e-6) or moved.max() <= 0.03 + 1e-6
    assert moved.sum() > 0
    assert not torch.equal(model.model.layers[3].eh_proj.weight, weight_before)  # the MTP module trains
