"""A study as a TOML file: the arguments of ``attnprobe.study``, checked before anything is loaded.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "study.toml"
    >>> _ = path.write_text('''
    ... out = "out/dogs"
    ... models = ["tiny"]
    ... concepts = ["dog", "Van Gogh"]
    ... variants = ["baseline", "instruction"]
    ... seeds = [0, 1, 2]
    ... steps = 10
    ... [capture]
    ... save = true
    ... ''')
    >>> config = load_config(path)
    >>> config["model"], config["seeds"], config["capture"]
    (['tiny'], [0, 1, 2], {'save': True})

Run it with ``attnprobe study --config study.toml`` (one process) or ``accelerate launch -m attnprobe study --config
study.toml`` (the grid split across processes), or ``attnprobe.study(**load_config("study.toml"))``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

__all__ = ["load_config", "CONFIG_KEYS"]

#: Every key a study file may hold, with the TOML type it takes (``variants`` and ``interventions`` may also be
#: tables of ``name = "template or spec"``; ``[capture]`` takes ``save``, ``heads``, ``dtype``).
CONFIG_KEYS = {
    "out": "string: the output folder (relative paths: to the working directory)",
    "model": "string: one model (tiny, tiny-xl, a hub id or a folder)",
    "models": "list of strings: several models, each a grid axis",
    "concepts": "list of strings",
    "variants": "list of names / name=template strings, or a table name = template",
    "interventions": "list of specs (e.g. 'zero-attention', 'early=zero-attention:calls=0-3'), or a table label = spec",
    "seeds": "list of integers",
    "steps": "integer",
    "guidance": "number",
    "size": "integer (pixels, a multiple of 8)",
    "device": "string: auto, cpu, cuda, …",
    "dtype": "string: fp32, fp16 or bf16",
    "scorer": "string: tiny, none, or a CLIP hub id / folder",
    "capture": "table: save (bool), heads ('mean' or 'keep'), dtype ('float16', 'bfloat16', 'float32')",
}

_TYPES = {
    "out": str, "model": str, "models": list, "concepts": list, "variants": (list, dict), "interventions": (list, dict, str),
    "seeds": list, "steps": int, "guidance": (int, float), "size": int, "device": str, "dtype": str, "scorer": str,
    "capture": dict,
}


def load_config(path) -> dict:
    """Read a study file into keyword arguments of ``attnprobe.study``.

    Args:
        path: a TOML file whose keys are those of ``CONFIG_KEYS``.

    Returns:
        ``{argument: value}`` for ``attnprobe.study`` (``models`` becomes ``model``, a list; ``interventions`` a spec
        string). Values are checked again by ``study`` (grid, variants, interventions) before any generation.

    Raises:
        ValueError: the file is missing or not TOML, holds an unknown key (the message lists the known ones), a
            value of the wrong type, or both ``model`` and ``models``.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"study config {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"study config {str(path)!r} is a folder; give a .toml file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"study config {str(path)!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"study config {str(path)!r}: unknown key{'s' if len(unknown) > 1 else ''} {unknown}; "
                         f"the keys are {sorted(CONFIG_KEYS)}")
    for key, value in data.items():
        expected = _TYPES[key]
        if not isinstance(value, expected) or isinstance(value, bool) and expected in (int, (int, float)):
            raise ValueError(f"study config {str(path)!r}: {key} = {value!r} is a {type(value).__name__}; "
                             f"it takes a {CONFIG_KEYS[key]}")
    for key, kind in (("concepts", str), ("models", str), ("seeds", int)):
        if key in data and any(not isinstance(v, kind) or isinstance(v, bool) for v in data[key]):
            raise ValueError(f"study config {str(path)!r}: {key} = {data[key]!r} must be a list of {kind.__name__}s")
    if "model" in data and "models" in data:
        raise ValueError(f"study config {str(path)!r}: give model or models, not both")
    config = dict(data)
    if "models" in config:
        config["model"] = config.pop("models")
    elif "model" in config:
        config["model"] = [config["model"]]
    interventions = config.get("interventions")
    if isinstance(interventions, dict):
        config["interventions"] = ",".join(f"{label}={spec}" for label, spec in interventions.items())
    elif isinstance(interventions, list):
        config["interventions"] = ",".join(str(spec) for spec in interventions)
    return config
