"""Training: aux loss, expert load statistics, auxiliary-loss-free bias update (plain loop and Trainer), loss
normalisation under gradient accumulation and gradient checkpointing."""

import pytest
import torch
from dsv3.convert.tiny import random_tiny_model
from dsv3.modeling_deepseek.modeling_deepseek import DeepseekV3MoE

from dsv3.training import ExpertBiasUpdateCallback, load_imbalance


def test_expert_load_counts_every_routed_token_of_a_training_forward():
    model = random_tiny_model("v3", seed=1).train()
    model.reset_expert_load()
    model(torch.randint(3, 512, (2, 9)), labels=torch.randint(3, 512, (2, 9)))
    load = model.expert_load()
    assert sorted(load) == [1, 2, 3]  # the two MoE layers and the MTP layer's MoE
    K = model.config.num_experts_per_tok
    assert load[1].sum().item() == 2 * 9 * K and load[3].sum().item() == 2 * 8 * K  # MTP sees S - 1 positions
    model.reset_expert_load()
    assert all(t.sum() == 0 for t in model.expert_load().values())


def test_expert_load_ignores_eval_and_generate_unless_measuring():
    # The counts feed the next bias update: evaluation and generation must not move it.
    model = random_tiny_model("v3", seed=1)
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    model.reset_expert_load()
    with torch.no_grad():
        model(ids, labels=ids)  # eval
        model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=2)
        model.train()(ids, labels=ids)  # training mode but no grad (e.g. a validation loop)
    assert all(t.sum() == 0 for t in model.expert_load().values())
    model.eval()
    with model.measuring_expert_load(), torch.no_grad():
        model(ids, output_mtp_logits=True)
    K = model.config.num_experts_per_tok
    assert [t.sum().item() for t in model.expert_load().values()] == [18 * K, 18 * K, 16 * K]
    assert model.model.count_every_forward is False  # restored


@pytest.mark.parametrize("reentrant", [None, True, False])
def test_expert_load_is_counted_once_under_gradient_checkpointing(reentrant):
    model = random_tiny_model("v3", seed=1).train()
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    ids = torch.randint(3, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    model.reset_expert_load()
    model(ids, labels=ids).loss.backward()  # the backward recomputes every checkpointed layer
    K = model.config.num_experts_per_tok
    assert [t.sum().item() for t in model.expert_load().values()] == [18 * K, 18 * K, 16 * K]


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
        with model.measuring_expert_load(), torch.no_grad():
            for ids in batches:
                model(ids, output_mtp_logits=True)  # runs the MTP layer (and its router) too
        return load_imbalance(model.expert_load())

    before = imbalance()
    bias_before = model.routers()[1].e_score_correction_bias.clone()
    for step in range(60):
        model.reset_expert_load()
        with model.measuring_expert_load(), torch.no_grad():  # the loads a training step would count
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


def _with_aux_alpha(model, alpha):
    model.config.aux_loss_alpha = alpha
    for moe in model._moe_blocks():
        moe.aux_loss_alpha = alpha
    return model


def test_sequence_aux_loss_follows_the_report_and_trains_the_router():
    model = _with_aux_alpha(random_tiny_model("v3", seed=4).train(), 0.01)
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(5))
    per_layer = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, i=i: per_layer.__setitem__(i, (args[0], out[1])))
        for i, m in enumerate(model.model.layers)
        if isinstance(m.mlp, DeepseekV3MoE)
        for m in [m.mlp]
    ]
    out = model(ids, labels=ids)
    for h in hooks:
        h.remove()
    assert sorted(per_layer) == [1, 2, 3]  # both MoE layers and the MTP layer's
    # Reference for layer 1 from its own router output on its actual input, written per sequence.
    x, aux_B = per_layer[1]
    moe = model.model.layers[1].mlp
    idx, _, s = moe.gate(x.reshape(-1, 256))
    E, K = 16, 4
    for b in range(2):
        sb, ib = s.view(2, 10, E)[b], idx.view(2, 10, K)[b]
        f = torch.stack([(ib == e).sum() for e in range(E)]).float() * E / (K * 10)
        p = (sb / sb.sum(-1, keepdim=True)).mean(0)
        assert abs(aux_B[b].item() - 0.01 * (f * p).sum().item()) < 1e-6
    # Every sequence has the same number of targets: the batch value is the mean over sequences, summed over layers.
    total = sum(a.mean() for _, a in per_layer.values())
    assert abs(out.aux_loss.item() - total.item()) < 1e-6
    assert abs(out.loss.item() - (out.lm_loss + 0.3 * out.mtp_loss + out.aux_loss).item()) < 1e-5
    out.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0
    model.eval()
    assert model(ids, labels=ids).aux_loss is None  # a training term only


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(got: dict, ref: dict, rel: float = 1e-5) -> None:
    # Relative to each tensor's largest entry: summation order differs (batch split, recomputation).
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        err = (got[name] - r).abs().max().item()
        assert err <= rel * r.abs().max().item() + 1e-12, (name, err, r.abs().max().item())


@pytest.mark.parametrize("reentrant", [True, False])
def test_router_gets_the_aux_loss_gradient_under_gradient_checkpointing(reentrant):
    ids = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(11))
    grads = []
    for ckpt in (False, True):
        model = _with_aux_alpha(random_tiny_model("v3", seed=12).train(), 0.01)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        out = model(ids, labels=ids)
        out.aux_loss.backward(retain_graph=True)
        aux_grads = {i: r.weight.grad.clone() for i, r in model.routers().items()}
        model.zero_grad()
        out.loss.backward()
        grads.append((aux_grads, _grads(model)))
    (aux_ref, ref), (aux_ckpt, got) = grads
    for i in aux_ref:
        assert aux_ref[i].abs().sum() > 0
    _assert_same_grads(aux_ckpt, aux_ref)
    _assert_same_grads(got, ref)


def _accumulated_grads(model, ids, labels, chunks, num_items):
    model.zero_grad()
    for part_ids, part_labels in zip(ids.chunk(chunks), labels.chunk(chunks), strict=True):
        out = model(part_ids, labels=part_labels, num_items_in_batch=num_items)
        (out.loss if num_items is not None else out.loss / chunks).backward()
    return _grads(model)


@pytest.mark.parametrize("with_num_items", [True, False])
def test_gradient_accumulation_gives_the_full_batch_gradient(with_num_items):
    # transformers.Trainer's two contracts: with num_items_in_batch (the targets of all micro-batches) the model
    # normalises and the micro-batch losses are summed; without it each micro-batch loss is divided by k.
    model = _with_aux_alpha(random_tiny_model("v3", seed=13).train(), 0.01)
    ids = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(14))
    model.zero_grad()
    full = model(ids, labels=ids)
    full.loss.backward()
    ref = _grads(model)
    num_items = torch.tensor(4 * 11) if with_num_items else None
    got = _accumulated_grads(model, ids, ids, 2, num_items)
    _assert_same_grads(got, ref)  # lm, MTP and aux terms alike (routers: lm + aux; eh_proj: MTP)


def test_aux_and_mtp_losses_with_num_items_add_up_over_micro_batches():
    # Uneven ignored labels: the aux term weights each sequence by its targets, so micro-batches add up exactly.
    model = _with_aux_alpha(random_tiny_model("v3", seed=15).train(), 0.01)
    ids = torch.randint(3, 512, (4, 12), generator=torch.Generator().manual_seed(16))
    labels = ids.clone()
    labels[0, :7] = labels[3, :3] = -100
    n = (labels[:, 1:] != -100).sum()
    with torch.no_grad():
        full = model(ids, labels=labels)
        parts = [
            model(i, labels=lb, num_items_in_batch=n)
            for i, lb in zip(ids.chunk(2), labels.chunk(2), strict=True)
        ]
    assert abs(sum(p.aux_loss for p in parts).item() - full.aux_loss.item()) < 1e-7
    assert abs(sum(p.lm_loss for p in parts).item() - full.lm_loss.item()) < 1e-5
    # Each MTP depth is normalised by its own targets (labels[:, 2:]), not by the main loss's count.
    with torch.no_grad():
        alone = model(ids, labels=labels, num_items_in_batch=n)
    assert abs(alone.mtp_loss.item() - full.mtp_loss.item()) < 1e-5


def test_trainer_gradient_accumulation_matches_one_big_batch(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    gen = torch.Generator().manual_seed(17)
    data = [{"input_ids": (t := torch.randint(3, 512, (12,), generator=gen)), "labels": t} for _ in range(4)]

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = _grads(model)

    grads = []
    for batch, accumulate in ((4, 1), (2, 2)):
        model = _with_aux_alpha(random_tiny_model("v3", seed=18).train(), 0.01)
        args = TrainingArguments(
            output_dir=str(tmp_path / f"{batch}x{accumulate}"),
            max_steps=1,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate,
            train_sampling_strategy="sequential",
            max_grad_norm=0.0,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        grab = Grab()
        Trainer(model=model, args=args, train_dataset=data, callbacks=[grab]).train()
        grads.append(grab.grads)
    ref, got = grads
    _assert_same_grads(got, ref)


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
