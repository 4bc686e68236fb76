"""A tiny Wan 2.2 text-to-video pipeline: diffusers' ``WanPipeline`` with two experts, the high-noise ``transformer``
(the calls whose timestep is at least ``boundary_ratio × num_train_timesteps``) and the low-noise ``transformer_2``
(the rest), both of the tiny Wan 2.1 structure of ``tiny_video.tiny_wan_pipeline``, seeded apart.
``attnprobe.models.tiny.tiny_pipeline("wan2.2")`` builds it.

    >>> pipe = tiny_wan22_pipeline()
    >>> type(pipe.transformer_2).__name__, pipe.config.boundary_ratio
    ('WanTransformer3DModel', 0.7)
"""

from __future__ import annotations

import torch

from .._quiet import quiet_notes
from .components import finish
from .tiny_video import _wan_parts

__all__ = ["tiny_wan22_pipeline", "BOUNDARY_RATIO"]

#: with the tiny scheduler's ``shift=3.0`` a 4-step call's timesteps are about 1000, 858, 602 and 9: the boundary 700 gives
#: the high-noise expert the first two steps and the low-noise expert the last two
BOUNDARY_RATIO = 0.7


@quiet_notes()
def tiny_wan22_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``WanPipeline`` with Wan 2.2's two experts: ``transformer`` and ``transformer_2`` of the tiny Wan 2.1
    structure (2 blocks, 2 heads of 8 channels, ``(1, 2, 2)`` patches), weights seeded ``seed`` and ``seed + 10``;
    ``boundary_ratio`` ``BOUNDARY_RATIO``, so a 4-step call runs each expert for two steps.

    Args:
        seed: weight seed. dtype: parameter dtype.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    parts = _wan_parts(WanTransformer3DModel, seed)
    second = _wan_parts(WanTransformer3DModel, seed + 10)["transformer"]
    pipe = WanPipeline(**parts, transformer_2=second, boundary_ratio=BOUNDARY_RATIO,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return finish(pipe, dtype)
