"""The study: does a natural-language unlearning instruction make the denoiser stop attending to a concept?

    >>> import attnprobe, tempfile
    >>> result = attnprobe.study(out=tempfile.mkdtemp(), concepts=["dog"], seeds=[0], steps=2, progress=False, echo=False)
    >>> len(result.aucs)          # one row per variant (baseline, instruction, implicit, repetition)
    4

``attnprobe.study`` is this package, and calling it runs ``attnprobe.study.study`` (``attnprobe.study(...)``), so
that its names (``attnprobe.study.SHAPES_VARIANTS``) and the function never shadow each other.

- ``run``: ``study()``: checks every setting, then runs the grid's cells (resumable, split across processes) and
  merges them into the tables and figures.
- ``measure``: one generation cell: every variant from one seed's noise under a probe, the intervention rows,
  presence scores.
- ``variants``: the default concepts and prompt variants, ``parse_variants``.
- ``config``: the TOML study file and the checks of every setting.
- ``scorer``: concept presence in the images (CLIPScore, the shapes model's checker, a user's scorer).
- ``cells``: cells, their shards and the manifest of finished work; ``processes``: accelerate's processes;
  ``lock``: one run per folder (an OS lock); ``files``: merges that never lose a table, temporary files of killed runs,
  file-system errors naming the path.
- ``contrasts``: the answer: paired contrasts between rows by seed (exact sign-flip test, Holm), and where and when
  attention changes (per site and denoiser call).
- ``report``: the CSVs, the summary with intervals, the figures, the printed table.
- ``page``: ``report.html``, one self-contained page (the answer first, the tables, the figures, a heat-map browser);
  ``attnprobe report DIR`` rewrites it.
- ``cli``: the ``attnprobe`` command.
"""

import sys
import types

from ..models.loader import TINY_MODELS, load_pipeline
from .run import StudyResult, study
from .variants import (
    DEFAULT_CONCEPTS,
    DEFAULT_VARIANTS,
    SHAPES_CONCEPTS,
    SHAPES_VARIANTS,
    parse_variants,
)

__all__ = ["study", "StudyResult", "DEFAULT_CONCEPTS", "DEFAULT_VARIANTS", "SHAPES_CONCEPTS", "SHAPES_VARIANTS",
           "load_pipeline", "parse_variants", "TINY_MODELS"]


class _CallableStudy(types.ModuleType):
    """This package's module type: calling the package runs ``study``."""

    def __call__(self, *args, **kwargs) -> StudyResult:
        return study(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableStudy
