"""Errors raised by attnprobe. Every one says what was passed, what exists, and what to do.

Every error attnprobe raises on purpose is an ``AttnprobeError``. Those that stand for a builtin error also subclass
it (``ArgumentError`` is a ``ValueError``, ``SelectionError`` an ``IndexError``, ``UnknownSiteError`` a ``KeyError``),
so that ``except ValueError`` in a user's code keeps working.
"""


import os
import sys
import warnings

#: packages whose frames a warning is not attributed to: the user's line that ran the pipeline is what they can act on
_INSIDE = ("attnprobe", "torch", "diffusers", "transformers", "accelerate", "contextlib", "functools")


class AttnprobeWarning(UserWarning):
    """Base class of every warning attnprobe gives (a row labelled unknown, a processor that edits the attention,
    NaN maps of samples missing from a call): ``warnings.filterwarnings("error", category=AttnprobeWarning)`` turns
    them into errors."""


def warn(message: str, category: type[Warning] = AttnprobeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside attnprobe, torch, diffusers and transformers: the
    user's line that called the pipeline, not the hook that noticed (warnings come from inside denoiser calls)."""
    files = [getattr(sys.modules.get(name), "__file__", None) for name in _INSIDE]
    inside = tuple(os.path.dirname(f) + os.sep if f.endswith("__init__.py") else f for f in files if f)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


class AttnprobeError(Exception):
    """Base class of every error attnprobe raises on purpose."""


class ArgumentError(AttnprobeError, ValueError):
    """An argument has a value attnprobe cannot use (says what was passed and what is allowed)."""


class ArgumentTypeError(AttnprobeError, TypeError):
    """An argument is of a type attnprobe cannot use (says what was passed and what is allowed)."""


class ConfigError(ArgumentError):
    """A study setting is invalid: a key or value of a study file, a command-line option, the grid, the output folder."""


class ScorerError(AttnprobeError, ValueError):
    """A presence scorer returned what the study cannot use (another count, a value outside its range, no numbers)."""


class NumericalError(AttnprobeError, FloatingPointError):
    """A computation gave non-finite values (NaN or inf), e.g. the attention of a generation whose latents diverged."""


class NoSitesError(AttnprobeError):
    """The denoiser has no cross-attention site (or the selection left none)."""


class UnknownSiteError(AttnprobeError, KeyError):
    """A site name or pattern matched no cross-attention site."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ProbeError(AttnprobeError):
    """The probe could not record what it was asked to (replaced processors, missing q/k, bad options)."""


class NoDenoiserCallError(ProbeError):
    """A probe closed without having seen a denoiser call: the pipeline was not called inside its ``with`` block."""


class SampleLayoutError(ProbeError):
    """A pipeline call's samples (prompts, passes, batch) or latent size differ from those the probe's store already
    holds: one store holds one sample layout and size, so open a new ``probe()`` for each such pipeline call."""


class ConceptError(AttnprobeError):
    """A concept is not in a sample's prompt, or lies past the tokenizer's maximum length."""


class SelectionError(AttnprobeError, IndexError):
    """A position, sample, call or occurrence chosen from a store is out of range (says what range exists)."""


class StoreError(AttnprobeError):
    """A store file is corrupt or truncated, or two stores cannot be compared."""


class StoreIOError(StoreError, OSError):
    """A file or folder of a store or a study could not be written or read (a full disk, a missing or read-only
    folder, a denied permission): the message names the path and the cause; ``errno`` and ``filename`` are those of
    the ``OSError`` (so ``except OSError`` keeps working), and what was written before it is kept."""

    @classmethod
    def of(cls, exc: OSError, path, doing: str = "cannot be written", then: str = "") -> "StoreIOError":
        """The error for ``exc`` met at ``path``: ``'<path>' <doing>: <cause>[; <then>]`` (``then``: what was kept and
        what to do)."""
        cause = exc.strerror or str(exc) or type(exc).__name__
        error = cls(f"{str(path)!r} {doing}: {cause}" + (f"; {then}" if then else ""))
        error.errno, error.strerror, error.filename = exc.errno, exc.strerror, str(path)
        return error

    def __str__(self) -> str:  # OSError would print "[Errno …] …" once errno is set
        return str(self.args[0]) if self.args else ""


class ModelLoadError(AttnprobeError):
    """A pipeline could not be built or loaded (offline, unknown id, missing weights)."""


class InterventionError(AttnprobeError):
    """An intervention is malformed, unknown, outside the run (its window), or cannot be applied to this pipeline."""
