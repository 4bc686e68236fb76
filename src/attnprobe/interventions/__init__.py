"""Interventions beyond language: edit a pipeline call's attention, conditioning or guidance, and see what the
denoiser then attends to.

    >>> import attnprobe
    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with intervene(pipe, [AttentionEdit(scale=0.0)], "a picture of dog", concept="dog") as run:
    ...     with attnprobe.probe(run.pipe, heads="mean") as store:
    ...         _ = run(num_inference_steps=2, height=64, width=64, output_type="latent")
    >>> attnprobe.trajectory(store, "dog").tolist()      # the recorded maps are the edited ones
    [0.0, 0.0]

- ``configs``: each intervention as a frozen dataclass (``AttentionEdit``, ``ConditioningEdit``, ``NegativePrompt``,
  ``SafeLatentDiffusion``), the ready-made ones by name (``INTERVENTIONS``) and ``parse_interventions``.
- ``apply``: ``intervene(pipe, configs, prompt)``: forward hooks for a ``with`` block (no processor is replaced),
  removed in ``finally``; ``Intervened`` calls the pipeline through them.
"""

from .apply import Intervened, denoiser_timesteps, intervene
from .configs import (
    INTERVENTIONS,
    AttentionEdit,
    ConditioningEdit,
    Intervention,
    NegativePrompt,
    SafeLatentDiffusion,
    parse_interventions,
)

__all__ = ["AttentionEdit", "ConditioningEdit", "NegativePrompt", "SafeLatentDiffusion", "Intervention", "INTERVENTIONS",
           "parse_interventions", "intervene", "Intervened", "denoiser_timesteps"]
