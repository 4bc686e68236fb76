"""attnprobe: record, per denoiser call, site, head and text token, the cross-attention of diffusers pipelines.

    >>> import attnprobe
    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with attnprobe.probe(pipe, heads="mean") as store:
    ...     _ = pipe("a picture of dog", num_inference_steps=3, height=64, width=64, output_type="latent")
    >>> attnprobe.trajectory(store, "dog").shape
    torch.Size([3])
"""

import sys

from . import _moved
from ._version import __version__

from . import study, text  # attnprobe.text: the text side; attnprobe.study: the study, callable
from .analysis import (Comparison, ConceptMaps, animate_heatmap, auc, compare, concept_attention, heatmap, relation_map,
                       trajectory)
from .capture import list_sites, probe
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    AttnprobeError,
    AttnprobeWarning,
    ConceptError,
    ConfigError,
    InterventionError,
    ModelLoadError,
    NoDenoiserCallError,
    NoSitesError,
    NumericalError,
    ProbeError,
    SampleLayoutError,
    ScorerError,
    SelectionError,
    StoreError,
    StoreIOError,
    UnknownSiteError,
)
from .interventions import (
    AttentionEdit,
    ConditioningEdit,
    Intervened,
    NegativePrompt,
    SafeLatentDiffusion,
    intervene,
    parse_interventions,
)
from .store import AttentionStore, Call, Sample, Site
from .study.config import load_config

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "AttentionEdit",
    "AttentionStore",
    "AttnprobeError",
    "AttnprobeWarning",
    "Call",
    "Comparison",
    "ConceptError",
    "ConceptMaps",
    "ConfigError",
    "ConditioningEdit",
    "Intervened",
    "InterventionError",
    "ModelLoadError",
    "NegativePrompt",
    "NoDenoiserCallError",
    "NoSitesError",
    "NumericalError",
    "ProbeError",
    "SafeLatentDiffusion",
    "SampleLayoutError",
    "ScorerError",
    "Sample",
    "SelectionError",
    "Site",
    "StoreError",
    "StoreIOError",
    "UnknownSiteError",
    "animate_heatmap",
    "auc",
    "compare",
    "concept_attention",
    "heatmap",
    "intervene",
    "list_sites",
    "load_config",
    "parse_interventions",
    "probe",
    "relation_map",
    "study",
    "trajectory",
]

_moved.install()


def __getattr__(name: str):
    """``attnprobe.plot`` and the other module paths of 0.1.0 (``attnprobe._moved``)."""
    old = sys.modules.get(f"attnprobe.{name}")
    if f"attnprobe.{name}" in _moved.MOVED and old is not None:
        return old
    raise AttributeError(f"module 'attnprobe' has no attribute {name!r}")
