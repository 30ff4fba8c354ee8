"""Training helpers that work with a plain PyTorch loop and with transformers.Trainer.

Plain loop:
    loss = model(ids, labels=ids).loss        # lm + mtp_loss_weight * mtp (+ aux when configured)
    loss.backward(); optimizer.step(); optimizer.zero_grad()
    model.update_expert_bias(gamma=0.001)      # auxiliary-loss-free balancing, after every optimizer step

Trainer:
    Trainer(model, args, train_dataset=..., callbacks=[ExpertBiasUpdateCallback(gamma=0.001)])

Expert load counts training forwards only (train mode with grad enabled: not eval, not generate), once per forward
also under gradient checkpointing. To measure balance on held-out data:
    with model.measuring_expert_load(), torch.no_grad(): ...

Every loss term (lm, each MTP depth, the sequence-wise aux term) is normalised per target token, by Trainer's
`num_items_in_batch` when it passes one, so gradient accumulation gives the full batch's gradient.
"""

import torch
from transformers import TrainerCallback


def _unwrap(model):
    while hasattr(model, "module"):  # DDP / accelerate wrappers
        model = model.module
    return model


class ExpertBiasUpdateCallback(TrainerCallback):
    """Runs model.update_expert_bias(gamma) after every optimizer step (bias_e += gamma * sign(mean - load_e))."""

    def __init__(self, gamma: float = 0.001) -> None:
        if gamma <= 0:
            raise ValueError(f"gamma: must be positive, got {gamma}")
        self.gamma = gamma

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            _unwrap(model).update_expert_bias(self.gamma)
        return control


def load_imbalance(load: dict[int, torch.Tensor]) -> float:
    """Mean over MoE layers of max/mean expert load (1.0 = perfectly balanced)."""
    ratios = [(t.float().max() / t.float().mean()).item() for t in load.values() if t.sum() > 0]
    return sum(ratios) / len(ratios) if ratios else float("nan")
