"""The study's answer: paired contrasts between rows (``contrasts.csv``) and where and when attention changes
(``where_when.csv``).

A contrast is a difference between two rows of one concept, paired by seed: ``instruction − repetition`` asks whether
the unlearning instruction lowers attention to the concept beyond what naming it twice does; ``implicit −
repetition`` the same for the instruction that does not name the concept; ``instruction − implicit`` whether naming
it in the instruction matters; ``<intervention> − instruction`` whether an edit beyond language does what the words do
not. Each is measured on Δ AUC of the requested mention (``delta_auc_last``), on Δ presence and, with the shapes
scorer, on Δ count (how many of the concept's objects the image shows); each is a difference
from the same seed's baseline, so the baseline cancels and the contrast is ``row − reference`` of the same seed.

Tests (per contrast, over seeds): the mean difference with a 95% Student-t interval; the p-value of the exact
sign-flip permutation test (Fisher 1935; every one of the ``2ⁿ`` sign patterns, for ``n ≤ 16`` seeds) or, above that,
of the paired t-test (the column ``test`` says which); ``p_holm``: Holm's step-down adjustment (Holm 1979) across the
concepts of one model, measure and contrast.
"""

from __future__ import annotations

import itertools
import math
from statistics import fmean
from typing import Sequence

import numpy as np

from ..errors import ArgumentError

__all__ = ["CONTRASTS", "contrast_rows", "sign_flip_p", "holm", "where_when_rows", "CONTRAST_COLUMNS",
           "WHERE_WHEN_COLUMNS", "MEASURES"]

#: ``(row, reference)`` pairs of the default variants, in the order the answer gives them (a variant of the user's is
#: contrasted with ``repetition`` too, when the study has it)
CONTRASTS = (("instruction", "repetition"), ("implicit", "repetition"), ("instruction", "implicit"))
#: the per-seed columns of ``auc.csv`` a contrast is measured on, with their names for people
MEASURES = {"delta_auc_last": "Δ AUC, requested mention", "delta_presence": "Δ presence",
            "delta_count": "Δ count of the concept's objects"}
#: the sign-flip test is exact (every sign pattern) up to this many seeds; the paired t-test above
EXACT_UP_TO = 16

CONTRAST_COLUMNS = ["model", "concept", "measure", "variant", "reference", "n", "mean", "ci_low", "ci_high", "test",
                    "p_value", "p_holm", "p_t", "p_sign_flip"]
WHERE_WHEN_COLUMNS = ["model", "concept", "variant", "site", "site_order", "grid", "call", "n", "mean", "ci_low",
                      "ci_high"]


def sign_flip_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of the exact sign-flip permutation test of mean 0 (Fisher 1935): the share of the ``2ⁿ``
    sign patterns whose |mean| is at least the observed one (ties counted, with a relative tolerance of 1e-12).
    Its smallest value is ``2 / 2ⁿ`` (0.5 for 2 seeds, 0.0625 for 5). NaN for no values.

    Raises:
        ArgumentError: more than 20 finite values (2²⁰ patterns; use the t-test).

        >>> sign_flip_p([1.0, 2.0, 3.0])
        0.25
    """
    d = np.asarray([v for v in differences if math.isfinite(v)], dtype=np.float64)
    n = len(d)
    if n == 0:
        return float("nan")
    if n > 20:
        raise ArgumentError(f"the exact sign-flip test enumerates 2^n patterns: n={n} is too many (use the t-test)")
    observed = abs(d.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))  # [2ⁿ, n]
    means = np.abs(signs @ d) / n
    return float(np.mean(means >= observed * (1 - 1e-12)))


def _t_p(differences: Sequence[float]) -> float:
    d = [v for v in differences if math.isfinite(v)]
    if len(d) < 2:
        return float("nan")
    mean = fmean(d)
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1))
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    from scipy.stats import t

    return float(2 * t.sf(abs(mean) / (sd / math.sqrt(len(d))), len(d) - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order; NaN stays NaN and is not counted.

        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    ranked = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    m, out, running = len(ranked), [float("nan")] * len(p_values), 0.0
    for k, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (m - k) * p))
        out[i] = round(running, 12)
    return out


def _pairs(names: Sequence[str], interventions: Sequence[str]) -> list[tuple[str, str]]:
    pairs = [(a, b) for a, b in CONTRASTS if a in names and b in names]
    if "repetition" in names:  # a variant of the user's: against the control of naming the concept twice
        pairs += [(v, "repetition") for v in names if v not in ("baseline", "repetition") and (v, "repetition") not in pairs]
    reference = "instruction" if "instruction" in names else "baseline"
    return pairs + [(label, reference) for label in interventions]


def contrast_rows(aucs: Sequence[dict], models, concepts, names: Sequence[str],
                  interventions: Sequence[str] = (), *, interval) -> list[dict]:
    """Per model, measure, contrast and concept: the paired differences ``row − reference`` over seeds.

    Args:
        aucs: the rows of ``auc.csv`` (one per model, concept, row and seed, with ``delta_auc_last`` and
            ``delta_presence``).
        names: the variants of the study; ``interventions``: its intervention rows (each contrasted with
            ``instruction``, or ``baseline`` when the study has no instruction variant).
        interval: ``values -> (mean, low, high)``, the 95% interval (the report's Student-t one).

    Returns:
        Dicts with ``CONTRAST_COLUMNS``: ``n`` seeds with both rows finite; ``mean``, ``ci_low``, ``ci_high``;
        ``p_t`` (paired t), ``p_sign_flip`` (exact sign-flip, ``n ≤ 16``), ``p_value`` (the second up to 16 seeds,
        else the first: ``test`` says which), ``p_holm`` (Holm across the concepts).
    """
    by_key = {(r["model"], r["concept"], r["variant"], r["seed"]): r for r in aucs}
    rows = []
    for model in models:
        for measure in MEASURES:
            for row, reference in _pairs(names, interventions):
                group = []
                for concept in concepts:
                    seeds = sorted({k[3] for k in by_key if k[:3] == (model, concept, row)})
                    d = []
                    for seed in seeds:
                        a, b = by_key.get((model, concept, row, seed)), by_key.get((model, concept, reference, seed))
                        x, y = (float("nan") if r is None else r.get(measure, float("nan")) for r in (a, b))
                        if math.isfinite(x) and math.isfinite(y):
                            d.append(x - y)
                    if not seeds:
                        continue
                    mean, low, high = interval(d)
                    p_t = _t_p(d)
                    p_flip = sign_flip_p(d) if 0 < len(d) <= EXACT_UP_TO else float("nan")
                    exact = len(d) <= EXACT_UP_TO
                    group.append(dict(model=model, concept=concept, measure=measure, variant=row, reference=reference,
                                      n=len(d), mean=mean, ci_low=low, ci_high=high,
                                      test="sign-flip exact" if exact else "paired t",
                                      p_value=p_flip if exact else p_t, p_t=p_t, p_sign_flip=p_flip))
                for r, p in zip(group, holm([r["p_value"] for r in group])):
                    r["p_holm"] = p
                if any(r["n"] for r in group):  # a measure this study has (presence needs a scorer, count shapes')
                    rows += group
    return rows


def where_when_rows(data: dict, interval) -> list[dict]:
    """Per model, concept, row, site and denoiser call: Δ attention on the requested mention (row − baseline of the
    same seed), the mean over seeds with its 95% interval.

    Args:
        data: ``{(model, concept): {"sites": [(name, "qh×qw"), …] in execution order, "rows": {row: {seed: float array
            [call, site]}}}}``: the mass on the requested mention per call and site (``trajectory(…, by_site=True)``).
        interval: ``values -> (mean, low, high)``.

    Returns:
        Dicts with ``WHERE_WHEN_COLUMNS`` (``grid``: the site's query grid, ``qh×qw``), for every row but the
        baseline, in execution order of the sites and then calls.
    """
    out = []
    for (model, concept), entry in data.items():
        rows = entry["rows"]
        base = rows.get("baseline", {})
        for row, seeds in rows.items():
            if row == "baseline":
                continue
            paired = [seeds[s] - base[s] for s in seeds if s in base and seeds[s].shape == base[s].shape]
            if not paired:
                continue
            stack = np.stack(paired)  # [seed, call, site]
            for j, (site, grid) in enumerate(entry["sites"]):
                for call in range(stack.shape[1]):
                    mean, low, high = interval(stack[:, call, j].tolist())
                    out.append(dict(model=model, concept=concept, variant=row, site=site, site_order=j, grid=grid,
                                    call=call, n=len(paired), mean=mean, ci_low=low, ci_high=high))
    return out
