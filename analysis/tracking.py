"""Attention metrics during pre-training: per-layer NMI and attention distance on a fixed probe batch.

The trainer calls ``tracker.maybe_log(step, model)`` every step and merges the returned dict (or
nothing) into its metrics line, so the curves of a global and an isolated run can be compared
over training, not only at the end (docs/method.md §8). The probe batch is fixed so that changes
come from the weights, not from the images.
"""

from __future__ import annotations

from torch import Tensor, nn

from analysis.measure import measure_attention


class AttentionTracker:
    """Every ``every_n_steps`` steps (0 disables), NMI and mean attention distance per layer.

    ``probe_images`` is a normalized (B, C, H, W) batch as the model trains on, e.g.
    ``analysis.loading.load_images("fmnist:0,1,2,3,4,5,6,7", img_size, in_chans).images``.
    Measuring runs the encoder in eval mode under no_grad on full images and restores the
    model's mode; it draws no random numbers, so it does not perturb the training run.
    """

    def __init__(self, probe_images: Tensor, every_n_steps: int) -> None:
        if probe_images.dim() != 4 or probe_images.shape[0] < 1:
            raise ValueError(f"probe_images must be a non-empty (B, C, H, W) batch, got shape {tuple(probe_images.shape)}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0 disables tracking), got {every_n_steps}")
        self.probe_images = probe_images.detach().cpu()
        self.every_n_steps = every_n_steps

    def maybe_log(self, step: int, model: nn.Module) -> dict[str, list[float]] | None:
        """``measure(model)`` when ``step`` is a multiple of ``every_n_steps`` (step 0 included), else None."""
        if self.every_n_steps == 0 or step % self.every_n_steps:
            return None
        return self.measure(model)

    def measure(self, model: nn.Module) -> dict[str, list[float]]:
        """``{"nmi_layer": [...], "attn_dist_layer": [...]}``, one head-mean value per encoder layer
        (``analysis.measure_attention``)."""
        table = measure_attention(model, self.probe_images)
        return {"nmi_layer": table["nmi"].tolist(), "attn_dist_layer": table["attention_distance"].tolist()}
