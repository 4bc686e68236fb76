"""attnprobe: record, per denoiser call, site, head and text token, the cross-attention of diffusers pipelines.

    >>> import attnprobe
    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with attnprobe.probe(pipe, heads="mean") as store:
    ...     _ = pipe("a picture of dog", num_inference_steps=3, height=64, width=64, output_type="latent")
    >>> attnprobe.trajectory(store, "dog").shape
    torch.Size([3])
"""

__version__ = "0.1.0"

from .analysis import Comparison, auc, compare, heatmap, trajectory  # noqa: E402
from .errors import (  # noqa: E402
    AttnprobeError,
    ConceptError,
    InterventionError,
    ModelLoadError,
    NoSitesError,
    ProbeError,
    SelectionError,
    StoreError,
    UnknownSiteError,
)
from .probe import probe  # noqa: E402
from .interventions import (  # noqa: E402
    AttentionEdit,
    ConditioningEdit,
    NegativePrompt,
    SafeLatentDiffusion,
    parse_interventions,
)
from .config import load_config  # noqa: E402
from .editing import Intervened, intervene  # noqa: E402
from .sites import Site, list_sites  # noqa: E402
from .store import AttentionStore, Call, Sample  # noqa: E402
from . import text  # noqa: E402  (attnprobe.text: text-encoder analysis)
# imported eagerly: the function must shadow its submodule's name (a lazy import would rebind
# attnprobe.study to the module on first use)
from .study import study  # noqa: E402


__all__ = [
    "AttentionEdit",
    "AttentionStore",
    "AttnprobeError",
    "Call",
    "Comparison",
    "ConceptError",
    "ConditioningEdit",
    "Intervened",
    "InterventionError",
    "ModelLoadError",
    "NegativePrompt",
    "NoSitesError",
    "ProbeError",
    "SafeLatentDiffusion",
    "Sample",
    "SelectionError",
    "Site",
    "StoreError",
    "UnknownSiteError",
    "auc",
    "compare",
    "heatmap",
    "intervene",
    "list_sites",
    "load_config",
    "parse_interventions",
    "probe",
    "study",
    "trajectory",
]
