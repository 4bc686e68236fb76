"""A study's settings: the TOML file (the arguments of ``attnprobe.study``) and the checks every setting passes
before anything is loaded or generated.

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

import json
import math
import numbers
import os
import tomllib
import unicodedata
from pathlib import Path

import torch

from ..capture.passes import check_guidance
from ..errors import ConfigError

__all__ = ["load_config", "CONFIG_KEYS", "CAPTURE", "DTYPES", "STUDY_PARTS", "MAX_STEPS", "MAX_SIZE", "check_grid",
           "check_capture", "check_models", "check_earlier_run", "check_out", "is_study_folder", "resolve_dtype", "check_guidance"]

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
    "frames": "integer: a video model's decoded frames per video (k·c + 1 for its temporal compression c)",
    "device": "string: auto, cpu, cuda, …",
    "dtype": "string: fp32, fp16 or bf16",
    "scorer": "string: auto, shapes, tiny, none, or a CLIP hub id / folder",
    "capture": "table: save (bool), heads ('mean' or 'keep'), dtype ('float16', 'bfloat16', 'float32'), "
               "tokens ('concept' or 'all')",
}

_TYPES = {
    "out": str, "model": str, "models": list, "concepts": list, "variants": (list, dict), "interventions": (list, dict, str),
    "seeds": list, "steps": int, "guidance": (int, float), "size": int, "frames": int, "device": str, "dtype": str, "scorer": str,
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
        ConfigError (a ValueError): the file is missing or not TOML, holds an unknown key (the message lists the known ones), a
            value of the wrong type, or both ``model`` and ``models``.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"study config {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"study config {str(path)!r} is a folder; give a .toml file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"study config {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"study config {str(path)!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"study config {str(path)!r}: unknown key{'s' if len(unknown) > 1 else ''} {unknown}; "
                         f"the keys are {sorted(CONFIG_KEYS)}")
    for key, value in data.items():
        expected = _TYPES[key]
        if not isinstance(value, expected) or isinstance(value, bool) and expected in (int, (int, float)):
            raise ConfigError(f"study config {str(path)!r}: {key} = {_short(value)} is a {type(value).__name__}; "
                             f"{key} takes: {CONFIG_KEYS[key]}")
    for key, kind in (("concepts", str), ("models", str), ("seeds", int), ("variants", str), ("interventions", str)):
        values = data.get(key, [])
        values = list(values.values()) if isinstance(values, dict) else values if isinstance(values, list) else []
        if any(not isinstance(v, kind) or isinstance(v, bool) for v in values):
            raise ConfigError(f"study config {str(path)!r}: {key} = {_short(data[key])} must hold only "
                             f"{'strings' if kind is str else 'integers'}")
    if "model" in data and "models" in data:
        raise ConfigError(f"study config {str(path)!r}: give model or models, not both")
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


def check_models(model) -> list[str]:
    """The study's models as a list of names (one name or a list).

    Raises:
        ConfigError (a ValueError): no model, a blank name, or a name given twice.
    """
    models = [model] if isinstance(model, (str, os.PathLike)) else list(model or [])
    models = [str(m) for m in models]
    if not models or any(not m.strip() for m in models):
        raise ConfigError(f"need at least one model name; got {model!r}")
    repeated = sorted({m for m in models if models.count(m) > 1})
    if repeated:
        raise ConfigError(f"models repeat {repeated}: each must be given once")
    return models


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The pipeline's dtype: a torch dtype or a name of ``DTYPES``; ``None``: fp16 on CUDA, fp32 elsewhere.

    Raises:
        ConfigError (a ValueError): a name not in ``DTYPES``.
    """
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


CAPTURE = {"save": False, "heads": "mean", "dtype": "float16", "tokens": "concept"}


def check_capture(capture) -> dict:
    """The probe settings of a study: ``save`` (stream every generation's maps to ``out/maps/``), ``heads``
    (``"mean"`` or ``"keep"``), ``dtype`` (``"float16"``, ``"bfloat16"`` or ``"float32"``) and ``tokens`` (``"concept"``:
    only the concept's positions, all the study reads; or ``"all"``) of the maps."""
    given = dict(capture or {})
    unknown = sorted(set(given) - set(CAPTURE))
    if unknown:
        raise ConfigError(f"unknown capture settings {unknown}; the settings are {sorted(CAPTURE)}")
    capture = {**CAPTURE, **given}
    if not isinstance(capture["save"], bool):
        raise ConfigError(f"capture save must be true or false; got {capture['save']!r}")
    if capture["heads"] not in ("mean", "keep"):
        raise ConfigError(f"capture heads must be 'mean' or 'keep'; got {capture['heads']!r}")
    if capture["tokens"] not in ("concept", "all"):
        raise ConfigError(f"capture tokens must be 'concept' or 'all'; got {capture['tokens']!r}")
    if capture["dtype"] not in ("float16", "float32", "bfloat16"):
        raise ConfigError(f"capture dtype must be 'float16', 'bfloat16' or 'float32'; got {capture['dtype']!r}")
    return capture


#: Files and folders of a study folder that a run writes (``--restart`` and the merge replace them, nothing else).
STUDY_PARTS = ("study.json", "cells", "manifest", "failed", "maps", "figures")


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def settings_differences(earlier: dict, now: dict) -> list[str]:
    """``key: old there, new now`` for each setting that differs (inside tables: ``variants.mine: …``)."""
    differ = []
    for key in sorted(set(earlier) | set(now)):
        a, b = earlier.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            differ += [f"{key}.{k}: {_short(a.get(k, '(none)'))} there, {_short(b.get(k, '(none)'))} now"
                       for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        else:
            differ.append(f"{key}: {_short(a)} there, {_short(b)} now")
    return differ


def check_earlier_run(out: Path, settings: dict) -> None:
    """A folder that holds finished cells is resumed only with the same settings (its cells would mix with this run's).

    Raises:
        ConfigError (a ValueError): ``out`` holds cells measured with other settings, or cells whose settings cannot be read.
    """
    if not (out / "cells").is_dir():
        return
    try:
        earlier = json.loads((out / "study.json").read_text())
        if not isinstance(earlier, dict):
            raise ConfigError("not a table")
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{str(out)!r} holds finished generations but its study.json cannot be read ({type(exc).__name__}), so "
            "their settings are unknown: use another --out, or --restart to discard them"
        ) from None
    differ = settings_differences({k: v for k, v in earlier.items() if k != "attnprobe"}, settings)
    if differ:
        shown = "; ".join(differ[:4]) + (f"; and {len(differ) - 4} more" if len(differ) > 4 else "")
        raise ConfigError(
            f"{str(out)!r} holds a study with other settings ({shown}): its finished generations would mix with this "
            "run's. Use another --out, or --restart to discard them."
        )


def check_out(out) -> Path:
    """The output folder as a path (``~`` expanded); refuses an empty name and study parts that are not folders.

    Raises:
        ConfigError (a ValueError): an empty ``out``, ``out`` or a part of it (``cells``, ``manifest``…) that is a file.
    """
    if out is None or not str(out).strip():
        raise ConfigError(f"out must name a folder; got {out!r}")
    out = Path(str(out)).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out {str(out)!r} is a file; give a folder")
    for part in STUDY_PARTS[1:]:
        if (out / part).exists() and not (out / part).is_dir():
            raise ConfigError(f"out {str(out)!r}: {part!r} there is a file, not the study's folder of that name")
    if (out / "study.json").is_dir():
        raise ConfigError(f"out {str(out)!r}: 'study.json' there is a folder, not the study's settings file")
    return out


def is_study_folder(out: Path) -> bool:
    """Whether ``out`` holds a study's files (``--restart`` deletes them only there)."""
    return (out / "study.json").is_file() or (out / "manifest").is_dir()


#: The most inference steps a study takes: schedulers are trained on 1000 timesteps (DDIM, PNDM and Euler refuse
#: more), and each step is a denoiser call per variant whose maps the study keeps.
MAX_STEPS = 1000
#: The largest image side a study takes (pixels): decoding needs about 128 channels × size² values per VAE activation
#: (4 GiB at 4096 px in fp16, 4× more per doubling); 4096 is the largest native size of a supported family (Sana 4K).
#: ``measure.check_size`` checks the model's own factor and memory once it is loaded.
MAX_SIZE = 4096


def _whole(value) -> bool:
    """A whole number (an int, numpy's too, or a finite float without a fraction), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return isinstance(value, numbers.Integral) or (math.isfinite(value) and value == int(value))


def _hidden(ch: str) -> bool:
    """A control character (line break, tab) or an invisible format one (zero-width space, BOM), but for the
    zero-width joiner of emoji sequences; a plain space is neither."""
    return unicodedata.category(ch) == "Cc" or (unicodedata.category(ch) == "Cf" and ch != "\u200d")


def check_grid(concepts, seeds, steps, guidance, size) -> None:
    """Refuse a grid that cannot run, before anything is loaded.

    Raises:
        ConfigError (a ValueError): no concept or seed; a blank concept, or one with a line break, tab or invisible
            character; a concept (spaces aside) or seed given twice (a repeated seed fakes a
            narrower interval); a seed outside 0 … 2**63 − 1; steps not a whole number in 1 … ``MAX_STEPS`` (1000);
            guidance not finite or < 0; a size (pixels) that is not a positive multiple of 8 or is over ``MAX_SIZE``
            (4096).
    """
    if not concepts or not seeds:
        raise ConfigError(f"need at least one concept and one seed; got concepts={concepts}, seeds={seeds}")
    if any(not isinstance(c, str) or not c.strip() for c in concepts):
        raise ConfigError(f"concepts must be non-empty words or phrases; got {concepts}")
    hidden = [c for c in concepts if any(_hidden(ch) for ch in c)]
    if hidden:
        raise ConfigError(f"concept {hidden[0]!r} holds a line break, tab or invisible character: give each concept "
                          "on one line, in plain words")
    if not all(_whole(s) for s in seeds):
        raise ConfigError(f"seeds must be whole numbers; got {list(seeds)}")
    bad = [s for s in seeds if not 0 <= s < 2**63]
    if bad:
        raise ConfigError(f"seeds {bad} are outside 0 … 2**63 − 1 (torch's generator seeds)")
    words = [" ".join(c.split()) for c in concepts]  # "dog " and "garbage  truck" are "dog" and "garbage truck"
    for kind, values, why in (("concepts", words, "a repeated concept would be run and counted twice"),
                              ("seeds", seeds, "a repeated seed fakes a narrower interval")):
        repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
        if repeated:
            spaces = " (spaces aside)" if kind == "concepts" and len(set(concepts)) > len(set(words)) else ""
            raise ConfigError(f"{kind} repeat {repeated}{spaces}: each must be given once ({why})")
    if not _whole(steps):
        raise ConfigError(f"steps must be a whole number; got {steps!r}")
    if not 1 <= int(steps) <= MAX_STEPS:
        raise ConfigError(f"steps must be 1 … {MAX_STEPS}; got {steps}: schedulers are trained on {MAX_STEPS} "
                          "timesteps (DDIM, PNDM and Euler refuse more steps than that), and every step is a denoiser "
                          "call per variant whose maps the study keeps")
    check_guidance(guidance)
    if size is None:
        return
    if not _whole(size):
        raise ConfigError(f"size must be a whole number of pixels; got {size!r}")
    if int(size) < 8 or int(size) % 8:
        raise ConfigError(f"size {size} is not a positive multiple of 8 (latent grids: SD's VAE downsamples by 8)")
    if int(size) > MAX_SIZE:
        raise ConfigError(f"size {size} is over {MAX_SIZE} pixels, the largest a study takes: decoding one image needs "
                          "the VAE's full-resolution activations, about 128 channels × size² values (4 GiB per "
                          f"activation at {MAX_SIZE} px in fp16, 4× more per doubling), beyond any one accelerator's "
                          f"memory above {MAX_SIZE}; {MAX_SIZE} px is also the largest native size of the supported "
                          "families (Sana 4K)")
