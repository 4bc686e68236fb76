"""Module paths of attnprobe 0.1.0's flat layout, resolved to their new rooms with a ``FutureWarning``.

Notebooks written against 0.1.0 (``from attnprobe.plot import plot_heatmaps``, ``attnprobe.zoo.shapes.render``)
keep working: each old module is a stand-in in ``sys.modules`` whose names are looked up, on first use, in the
modules that now hold them. Each use warns with the new path (Python shows a warning once per line of code that
causes it). No room imports this module's names; ``attnprobe/__init__`` installs the stand-ins.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     from attnprobe.plot import plot_heatmaps
    >>> plot_heatmaps.__module__, caught[0].category.__name__
    ('attnprobe.analysis.figures', 'FutureWarning')
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings

__all__ = ["MOVED", "LEFT", "GONE", "install", "package_getattr"]

#: old module -> the modules that now hold its names, searched in order
MOVED = {
    "attnprobe.plot": ("attnprobe.analysis.figures",),
    "attnprobe.probe": ("attnprobe.capture.entry", "attnprobe.capture.recorder"),
    "attnprobe.sites": ("attnprobe.capture.sites", "attnprobe.store.records"),
    "attnprobe.processors": ("attnprobe.capture.processor", "attnprobe.capture.cross", "attnprobe.capture.kinds"),
    "attnprobe.joint": ("attnprobe.capture.joint", "attnprobe.capture.kinds"),
    "attnprobe.layout": ("attnprobe.capture.rows",),
    "attnprobe.editing": ("attnprobe.interventions.apply",),
    "attnprobe.tokens": ("attnprobe.text.tokens",),
    "attnprobe.shards": ("attnprobe.store.shards",),
    "attnprobe.cli": ("attnprobe.study.cli",),
    "attnprobe.config": ("attnprobe.study.config", "attnprobe.study.cli"),
    "attnprobe.report": ("attnprobe.study.report", "attnprobe._atomic"),
    "attnprobe.runner": ("attnprobe.study.cells", "attnprobe.study.processes", "attnprobe.study.lock"),
    "attnprobe.scorer": ("attnprobe.study.scorer",),
    "attnprobe.variants": ("attnprobe.study.variants", "attnprobe.study"),
    "attnprobe.zoo": ("attnprobe.models.shapes",),
    "attnprobe.zoo.shapes": ("attnprobe.models.shapes.scenes", "attnprobe.models.shapes.evaluate",
                             "attnprobe.models.shapes.__main__"),
    "attnprobe.zoo.shapes_model": ("attnprobe.models.shapes.model", "attnprobe.models.shapes.evaluate"),
    "attnprobe.zoo.shapes_eval": ("attnprobe.models.shapes.evaluate",),
}

#: old module that is now a package of the same name -> the modules that hold the names that left it
LEFT = {"attnprobe.capture": ("attnprobe.capture.selection", "attnprobe.capture.sink")}

#: old ``module.name`` without a one-to-one successor -> what to use instead
GONE = {
    "attnprobe.joint.text_streams": "the denoiser family's text_streams: "
                                    "attnprobe.capture.family_of(denoiser).text_streams(pipe)",
    "attnprobe.layout.BatchLayout": "attnprobe.capture.rows.BatchRows (an object the recorder owns)",
    "attnprobe.shards.write_json_atomic": "attnprobe._atomic.write_atomic(path, json.dumps(data).encode())",
}


def _lookup(old: str, name: str, homes: tuple[str, ...]):
    for new in homes:
        module = importlib.import_module(new)
        if hasattr(module, name):
            value = getattr(module, name)
            top = sys.modules["attnprobe"]
            path = f"attnprobe.{name}" if getattr(top, name, None) is value else f"{new}.{name}"
            warnings.warn(f"{old}.{name} is now {path}; the old path is attnprobe 0.1.0's and will be removed",
                          FutureWarning, stacklevel=3)
            return value
    if f"{old}.{name}" in GONE:
        raise AttributeError(f"{old}.{name} is gone; use {GONE[f'{old}.{name}']}")
    raise AttributeError(f"module {old!r} has no attribute {name!r} (its names are now in {', '.join(homes)})")


class _StandIn(types.ModuleType):
    """An old module: attribute lookups go to the modules that hold its names now."""

    def __getattr__(self, name: str):
        if name == "__all__":  # so that `from attnprobe.plot import *` imports what the new modules export
            return sorted({n for new in MOVED[self.__name__] for n in getattr(importlib.import_module(new), "__all__", ())})
        if name.startswith("__"):
            raise AttributeError(name)
        child = f"{self.__name__}.{name}"
        if child in sys.modules:  # attnprobe.zoo.shapes
            return sys.modules[child]
        return _lookup(self.__name__, name, MOVED[self.__name__])

    def __dir__(self):
        return sorted({n for new in MOVED[self.__name__] for n in dir(importlib.import_module(new))})


def package_getattr(package: str):
    """A package's ``__getattr__`` (PEP 562) that finds the names its old module held and it no longer does."""

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return _lookup(package, name, LEFT[package])

    return __getattr__


def install() -> None:
    """Put a stand-in for each old module into ``sys.modules`` (nothing is imported until a name is used)."""
    for old in MOVED:
        if old not in sys.modules:
            sys.modules[old] = _StandIn(old, f"attnprobe 0.1.0's {old}; its names are now in {', '.join(MOVED[old])}")
