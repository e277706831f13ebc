"""Helpers for the transformers oracle tests (torch is passed in, never imported here)."""
from __future__ import annotations


def randomize_hf_weights(model, torch) -> None:
    """Redraw a transformers model's weights so its logits are far from uniform:
    linear/embedding weights ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.2²), biases ~ N(0, 0.2²).
    (transformers' own init — std 0.02, zero biases, unit norms — hides mistakes.)"""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
