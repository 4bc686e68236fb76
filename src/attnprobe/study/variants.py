"""The study's concepts and prompt variants: the defaults (for the tiny and hub models, and the shapes model's own
in its 16-token grammar) and ``parse_variants``, which reads ``--variants`` / ``variants=``.

    >>> list(parse_variants("instruction,mine=Draw {c} twice: {c}"))
    ['baseline', 'instruction', 'mine']
"""

from __future__ import annotations

import re
from typing import Mapping

from ..errors import ConfigError
from ..models.shapes.model import HELD_OUT
from ..models.shapes.scenes import COLOURS, SHAPES

__all__ = ["DEFAULT_CONCEPTS", "DEFAULT_VARIANTS", "SHAPES_CONCEPTS", "SHAPES_VARIANTS", "model_defaults",
           "parse_variants", "shapes_concept_warnings"]

#: Ten concepts: five objects (ESD / Concept Ablation style), two artist styles, a landmark, a character and
#: a two-word object, so that multi-token concepts are covered.
DEFAULT_CONCEPTS = [
    "dog",
    "cat",
    "church",
    "parachute",
    "garbage truck",
    "apple",
    "Van Gogh",
    "Picasso",
    "Eiffel Tower",
    "Mickey Mouse",
]

#: Prompt variants (``{c}`` is the concept). ``baseline`` is required: every Δ is taken against it.
#: ``instruction`` is the explicit unlearning instruction of arXiv 2604.01514; ``implicit`` is ours: it asks
#: for the picture and, in the same sentence, to leave the concept out, without the word "forget";
#: ``repetition`` mentions the concept twice with no instruction, so that "the concept appears twice" can
#: be told apart from "the instruction".
DEFAULT_VARIANTS = {
    "baseline": "a picture of {c}",
    "instruction": "Please forget anything about {c}. Please help me generate a picture of {c}.",
    "implicit": "Please leave {c} out of it and help me generate a picture of {c}.",
    "repetition": "a picture of {c}. a picture of {c}.",
}

#: The shapes model's concepts (colour–shape pairs it was trained on).
SHAPES_CONCEPTS = ["red circle", "green square", "blue triangle"]

#: The same four variants in the shapes model's grammar, within its 16 tokens (``attnprobe.models.shapes.model``):
#: the baseline is one of its training captions; the instruction, the implicit request and the repetition are
#: sentences it never saw in training (it was trained on captions only: no instruction can mean anything to it).
SHAPES_VARIANTS = {
    "baseline": "a {c} on the left",
    "instruction": "please forget {c} . please draw a {c} on the left",
    "implicit": "leave {c} out . a {c} on the left",
    "repetition": "a {c} . a {c} on the left",
}


def shapes_concept_warnings(concepts) -> list[str]:
    """What to warn about concepts the shapes model cannot draw: no colour or shape word of its grammar, or a
    held-out colour–shape pair (one message each)."""
    messages = []
    for concept in concepts:
        words = concept.lower().split()
        if not set(words) & (set(COLOURS) | set(SHAPES)):
            messages.append(f"{concept!r}: the shapes model knows only the colours {', '.join(COLOURS)} and the shapes "
                            f"{', '.join(SHAPES)}; its images cannot show this concept (attention to it is still "
                            "measured)")
        for colour, shape in sorted(HELD_OUT):
            if colour in words and shape in words:
                messages.append(f"{concept!r}: the shapes model never saw a {colour} {shape} in training (a held-out pair; it "
                                "draws the colour with another shape, docs/shapes-model.md)")
    return messages


def model_defaults(model: str) -> tuple[list[str], dict[str, str], str]:
    """Concepts, variants and scorer a study uses when not given: the shapes model's own for ``"shapes"``."""
    if model == "shapes":
        return SHAPES_CONCEPTS, SHAPES_VARIANTS, "shapes"
    return DEFAULT_CONCEPTS, DEFAULT_VARIANTS, "tiny"

def parse_variants(spec, defaults: Mapping[str, str] = DEFAULT_VARIANTS) -> dict[str, str]:
    """Variants from names of ``defaults`` (``DEFAULT_VARIANTS``; ``SHAPES_VARIANTS`` for the shapes model) and/or
    ``name=template`` entries (template has ``{c}``).

    Accepts a dict, a list, or a comma-separated string. ``baseline`` is always included.

    Raises:
        ConfigError (a ValueError): an unknown name, a template without ``{c}`` (says which exist), a name that is empty or holds
            characters other than letters, digits, ``_`` and ``-``, or a name given twice.
    """
    if spec is None:
        return dict(defaults)
    given = spec
    if isinstance(spec, Mapping):
        items = list(spec.items())
    else:
        if isinstance(spec, str):
            spec = spec.strip().rstrip(",")  # a trailing comma adds no variant
            # split on the commas that start a new entry (a known name or "name="), so templates may hold commas
            known = "|".join(re.escape(k) for k in defaults)
            spec = re.split(rf",\s*(?=\w[\w-]*\s*=|(?:{known})\s*(?:,|$))", spec)
        if any(not isinstance(p, str) for p in spec):
            raise ConfigError(f"variants must be names or name=template texts; got {list(spec)!r}")
        parts = [p.strip() for p in spec if p.strip()]
        items = []
        for p in parts:
            if "=" in p:
                name, template = p.split("=", 1)
                items.append((name.strip(), template.strip()))
            elif p in defaults:
                items.append((p, defaults[p]))
            else:
                raise ConfigError(f"unknown variant {p!r}: use one of {list(defaults)} or name=template with {{c}}")
    bad = [(n, t) for n, t in items if not isinstance(n, str) or not isinstance(t, str)]
    if bad:
        raise ConfigError(f"variants must be names and templates as text; got {bad[0][0]!r}: {bad[0][1]!r}")
    names = [n for n, _ in items]
    for name in names:
        if not re.fullmatch(r"\w[\w-]*", name):
            raise ConfigError(f"variant name {name!r}: a name is letters, digits, _ and - (no spaces or commas); "
                             f"got it from {given!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"variant {repeated[0]!r} is given {names.count(repeated[0])} times; give each name once")
    variants = dict(items)
    for name, template in variants.items():
        if "{c}" not in template:
            raise ConfigError(f"variant {name!r} template {template!r} has no {{c}} for the concept")
        try:
            template.format(c="concept")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"variant {name!r} template {template!r} has braces other than {{c}} ({type(exc).__name__}: {exc}); "
                "write a literal brace as {{ or }}"
            ) from None
    if "baseline" not in variants:
        variants = {"baseline": defaults["baseline"], **variants}
    return variants
