"""Analysis: pure functions over stores, and figures.

    >>> from attnprobe.testing import synthetic_store
    >>> store = synthetic_store(calls=3, prompt="a picture of dog", mass={"dog": [0.5, 0.25, 0.0]})
    >>> auc(trajectory(store, "dog"))
    0.25

- ``measures``: a concept's attention mass per denoiser call (``trajectory``), its area (``auc``), two captures
  compared (``compare``), a heat map over the image (``heatmap``), the calls of one pipeline call
  (``generation_calls``).
- ``video``: video stores over their decoded frames: which latent frame each shows (``decoded_frame_index``), a heat
  map per decoded frame (``frame_heatmaps``), an animated GIF over the video (``animate_heatmap``).
- ``concepts``: ConceptAttention (Helbling et al. 2025): output-space concept maps of a Flux or SD3 transformer beside a
  pipeline call (``concept_attention``, a context manager like ``probe``; its ``ConceptMaps`` holds the raw
  cross-attention of the same words for comparison).
- ``relations``: one query's map of a probe's relations (``relation_map``: image->image, text->image, text->text).
- ``daam``: DAAM 0.2.0's heat map (``heatmap(method="daam")``), step by step in DAAM's order.
- ``figures``: matplotlib figures of stores and studies (matplotlib imported when a figure is drawn).

Analyses read a store only through its public methods; they never run a pipeline (``concept_attention`` hooks the
denoiser beside the user's own pipeline call, as ``probe`` does).
"""

from .concepts import ConceptMaps, concept_attention
from .measures import (HEATMAP_METHODS, Comparison, auc, compare, concept_positions, generation_calls, heatmap,
                       trajectory)
from .relations import relation_map
from .video import animate_heatmap, decoded_frame_index, frame_heatmaps

__all__ = ["trajectory", "auc", "compare", "heatmap", "Comparison", "concept_positions", "generation_calls",
           "HEATMAP_METHODS", "concept_attention", "ConceptMaps", "animate_heatmap", "decoded_frame_index", "frame_heatmaps",
           "relation_map"]
