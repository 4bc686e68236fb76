"""Figures for studies and stores. matplotlib is imported only when a function here is called.

Every function returns a ``matplotlib.figure.Figure`` (saved by the caller); nothing is shown.
"""

from __future__ import annotations

import math
import textwrap
from typing import Mapping, Sequence

import numpy as np

from .measures import concept_positions, require_per_call, require_store

__all__ = ["plot_trajectories", "plot_delta_auc", "plot_heatmaps", "plot_text_similarity", "plot_site_call_grid", "shorten",
           "plot_presence", "plot_frames"]


_KNOWN = ("baseline", "instruction", "implicit", "repetition")


def _colours(variants) -> dict[str, str]:
    """One colour per variant, the same in every figure: the default variants keep theirs; others follow."""
    names = list(dict.fromkeys(variants))
    out = {v: f"C{_KNOWN.index(v)}" for v in names if v in _KNOWN}
    # then the light shades of tab20 (intervention rows can make more than ten)
    light = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")
    free = iter([f"C{i}" for i in range(len(_KNOWN), 10)] + list(light))
    for v in names:
        if v not in out:
            out[v] = next(free, "gray")
    return out


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_trajectories(
    trajectories: Mapping[str, Mapping[str, np.ndarray]],
    ylabel: str = "attention mass on concept tokens",
    xlabel: str = "denoiser call",
    title: str = "Attention on the concept per denoiser call (mean over seeds, band: min–max)",
):
    """One panel per concept; per variant the mean trajectory across seeds with a min–max band.

    Args:
        trajectories: ``{concept: {variant: array [seed, call]}}``.
        ylabel: the y axis label.
        xlabel: the x axis label.
        title: the figure title.

    Returns:
        The figure (each panel has its own y axis: variants are compared within a concept, and a two-token concept
        sits near twice a one-token one's level).
    """
    plt = _plt()
    concepts = list(trajectories)
    cols = min(5, max(1, len(concepts)))
    rows = math.ceil(len(concepts) / cols)
    width_in = max(3.2 * cols, 5.0)  # one concept: a wider panel rather than a title wider than the figure
    fig, axes = plt.subplots(rows, cols, figsize=(width_in, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(concepts):]:
        ax.set_visible(False)
    colours = _colours(v for c in concepts for v in trajectories[c])
    for ax, concept in zip(axes.flat, concepts):
        for variant, arr in trajectories[concept].items():
            arr = np.asarray(arr, dtype=float)
            x = np.arange(arr.shape[1])
            mean = arr.mean(axis=0)
            (line,) = ax.plot(x, mean, label=variant, lw=1.6, color=colours[variant])
            if arr.shape[0] > 1:
                ax.fill_between(x, arr.min(axis=0), arr.max(axis=0), color=line.get_color(), alpha=0.2, lw=0)
        ax.set_title(shorten(concept, 30), fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=8)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(textwrap.fill(title, int(10 * width_in)), fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    return fig


def shorten(text: str, limit: int) -> str:
    """A label of at most ``limit`` characters: its start and its end around an ellipsis, so that long names that
    differ only at the end stay apart (the tables keep the whole text)."""
    text = str(text)
    if len(text) <= limit:
        return text
    tail = (limit - 1) // 3
    return text[: limit - 1 - tail] + "…" + text[len(text) - tail:]


def _err_length(upper: float, lower: float) -> float:
    """An error bar's length from its ends: NaN (drawn as no bar) when an end is missing, never negative."""
    if not (math.isfinite(upper) and math.isfinite(lower)):
        return float("nan")
    return max(upper - lower, 0.0)


def plot_delta_auc(summary: Sequence[Mapping], panels: Sequence[tuple[str, str, str, str]] | None = None):
    """Grouped bars: per concept, Δ AUC vs the baseline of each variant, with its 95% interval.

    Args:
        summary: rows with ``concept``, ``variant`` and, per panel, a value and its interval columns (NaN allowed).
        panels: ``(title, value, low, high)`` column names per panel. Default: two panels, the requested
            (last) mention (``delta_auc_last``, …``_last``), then every mention (``delta_auc``, ``ci_low``,
            ``ci_high``).

    Returns:
        The figure.
    """
    plt = _plt()
    panels = panels or [
        ("requested (last) mention", "delta_auc_last", "ci_low_last", "ci_high_last"),
        ("every mention summed (> 0 by construction when a variant names the concept twice)", "delta_auc",
         "ci_low", "ci_high"),
    ]
    concepts = list(dict.fromkeys(r["concept"] for r in summary))
    variants = list(dict.fromkeys(r["variant"] for r in summary))
    table = {(r["concept"], r["variant"]): r for r in summary}
    width_in = max(6.0, 0.9 * len(concepts) + 2)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width_in, 3.0 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(variants))
    colours = _colours(variants)
    for ax, (title, value, low, high) in zip(axes[:, 0], panels):
        for i, variant in enumerate(variants):
            vals, errs = [], [[], []]
            for c in concepts:
                r = table.get((c, variant), {})
                v = float(r.get(value, float("nan")))
                lo, hi = float(r.get(low, float("nan"))), float(r.get(high, float("nan")))
                vals.append(v)
                errs[0].append(_err_length(v, lo))  # NaN (one seed): no error bar rather than a zero-width one
                errs[1].append(_err_length(hi, v))
            x = np.arange(len(concepts)) + (i - (len(variants) - 1) / 2) * width
            ax.bar(x, vals, width, yerr=errs, capsize=2, label=variant, color=colours[variant])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(concepts)), [shorten(c, 24) for c in concepts], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Δ AUC vs baseline", fontsize=8)
        # ~11 characters of 9-point text per inch of figure: the title wraps inside the figure
        ax.set_title(textwrap.fill(f"Δ attention, {title} (mean over seeds, 95% CI)", int(11 * width_in)), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars
    fig.tight_layout()
    return fig


def plot_presence(summary: Sequence[Mapping], scorer: str | None = None):
    """Δ attention against Δ presence: per concept and row (variant or intervention), the mean Δ AUC of the
    requested mention (x) and the mean Δ presence score (y) vs the baseline, with their 95% intervals.

    Args:
        summary: rows with ``concept``, ``variant``, ``delta_auc_last``, ``ci_low_last``, ``ci_high_last``,
            ``delta_presence``, ``ci_low_presence``, ``ci_high_presence`` (NaN allowed); baseline rows are skipped.
        scorer: the scorer's name, for the axis label.

    Returns:
        The figure: lower left means less attention to the concept and less of it in the image.
    """
    plt = _plt()
    rows = [r for r in summary if r["variant"] != "baseline"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colours = _colours(variants)
    markers = "osD^vP*Xh<>p"
    fig, ax = plt.subplots(figsize=(7.0, 5.0))

    def err(r, value, low, high):
        v, lo, hi = (float(r.get(k, float("nan"))) for k in (value, low, high))
        return [[_err_length(v, lo)], [_err_length(hi, v)]]

    handles, labels = [], []
    for k, variant in enumerate(variants):
        mine = [r for r in rows if r["variant"] == variant]
        marker = markers[k % len(markers)]
        for r in mine:
            ax.errorbar(r["delta_auc_last"], r["delta_presence"],
                        xerr=err(r, "delta_auc_last", "ci_low_last", "ci_high_last"),
                        yerr=err(r, "delta_presence", "ci_low_presence", "ci_high_presence"),
                        fmt=marker, color=colours[variant], ms=5, capsize=2, lw=0.8)
            # each variant's labels on their own line beside the point: points that coincide keep readable labels
            labels.append(ax.annotate(shorten(r["concept"], 20), (r["delta_auc_last"], r["delta_presence"]),
                                      fontsize=6, color=colours[variant], xytext=(4, 4 - 8 * k),
                                      textcoords="offset points",  # a pale ground: readable over error bars
                                      bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.7)))
        handles.append(plt.Line2D([], [], ls="none", marker=marker, color=colours[variant], ms=5, label=variant))
    ax.axhline(0, color="black", lw=0.8)
    ax.axvline(0, color="black", lw=0.8)
    ax.xaxis.set_major_locator(plt.MaxNLocator(6))  # small Δ values have long tick labels
    ax.set_xlabel("Δ attention AUC vs baseline, requested mention", fontsize=8)
    ax.set_ylabel(f"Δ presence vs baseline ({shorten(scorer or 'scorer', 40)})", fontsize=8)
    ax.set_title("Does lowering attention remove the concept from the image? (mean over seeds, 95% CI)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    _apart(fig, labels, ax)
    return fig


def _apart(fig, labels: list, ax, step: float = 7.0, tries: int = 6) -> None:
    """Move each annotation down or up by ``step`` points (0, -1, +1, -2, … steps) until its box overlaps none of
    those placed before it nor a labelled point's marker (points a few pixels apart in x otherwise run their labels
    together); one that finds no free place within ``tries`` steps stays where it was asked to be. Each try is one
    vectorised test against every box placed, so hundreds of labels take a fraction of a second."""
    get_renderer = getattr(fig.canvas, "get_renderer", None)
    if get_renderer is None or not labels:
        return
    renderer = get_renderer()
    radius = 3.0 * fig.dpi / 72  # a marker of ms=5 is 5 points across
    points = ax.transData.transform([label.xy for label in labels])
    points = points[np.isfinite(points).all(axis=1)]
    # [x0, y0, x1, y1] of every box placed: the markers first, then each label where it lands
    boxes = np.empty((len(points) + len(labels), 4))
    n = len(points)
    boxes[:n] = np.hstack([points - radius, points + radius])
    shifts = [0.0] + [sign * i * step for i in range(1, tries + 1) for sign in (-1, 1)]
    pixels = fig.dpi / 72  # an offset in points moves the box by this many pixels a point
    for label in labels:
        x0, y0, x1, y1 = label.get_window_extent(renderer).extents  # laid out once; a shift only moves it
        placed = boxes[:n]
        for dy in shifts:
            low, high = y0 + dy * pixels, y1 + dy * pixels
            if not np.any((placed[:, 0] < x1) & (placed[:, 2] > x0) & (placed[:, 1] < high) & (placed[:, 3] > low)):
                break
        else:
            dy, low, high = 0.0, y0, y1
        label.xyann = (label.xyann[0], label.xyann[1] + dy)
        boxes[n] = (x0, low, x1, high)
        n += 1


def plot_heatmaps(images: Mapping[str, object], maps: Mapping[str, Mapping[str, np.ndarray]]):
    """A grid of heat maps over the generated images: rows are concepts, columns variants.

    Args:
        images: ``{concept: {variant: image}}`` as PIL images or ``[H, W, 3]`` arrays in ``[0, 1]``, drawn in grey
            under the maps (so that the image's colours are not read as the colour scale's).
        maps: ``{concept: {variant: [H, W] array}}``, the same size as the images. Each map is scaled to
            ``[0, 1]`` by its own minimum and maximum before plotting (its contrast, not its level, is shown:
            the level is in the trajectories).

    Returns:
        The figure, with one colour bar.
    """
    plt = _plt()
    concepts = list(maps)
    variants = list(dict.fromkeys(v for c in concepts for v in maps[c]))
    fig, axes = plt.subplots(
        len(concepts), len(variants), figsize=(2.0 * len(variants) + 1.2, 2.0 * len(concepts)), squeeze=False,
        layout="constrained",
    )
    im = None
    for i, c in enumerate(concepts):
        for j, v in enumerate(variants):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if v not in maps[c]:
                ax.set_visible(False)
                continue
            img = images.get(c, {}).get(v)
            extent = None
            if img is not None:
                img = np.asarray(img)
                extent = (0, img.shape[1], img.shape[0], 0)  # the map over the whole image, whatever its resolution
                # the image in light grey under the map: its own colours, or dark shapes, would read as values of
                # the colour scale (a dark shape under a light colour looks like a low value)
                grey = img[..., :3].mean(axis=-1) if img.ndim == 3 else img
                grey = grey.astype(float) / max(float(grey.max()), 1e-9)
                ax.imshow(0.3 + 0.7 * grey, cmap="gray", vmin=0, vmax=1, extent=extent)
            m = np.asarray(maps[c][v], dtype=float)
            finite = np.isfinite(m)
            if finite.any():  # NaN pixels stay blank; the rest is scaled by the finite values
                low, span = m[finite].min(), m[finite].max() - m[finite].min()
                m = np.where(finite, (m - low) / span if span > 0 else 0.0, np.nan)
            else:
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center", fontsize=7, transform=ax.transAxes)
            im = ax.imshow(m, cmap="viridis", alpha=0.6 if img is not None else 1.0, vmin=0, vmax=1, extent=extent)
            if i == 0:
                ax.set_title(shorten(v, 24), fontsize=8)
            if j == 0:
                ax.set_ylabel(textwrap.fill(c, 24, max_lines=3, placeholder="…"), fontsize=8)
    if im is not None:
        label = "attention on concept (min–max scaled)" if len(concepts) > 1 else "attention\n(min–max scaled)"
        bar = fig.colorbar(im, ax=axes, shrink=min(0.8, 3.0 / len(concepts) + 0.2))
        bar.set_label(label, fontsize=8)  # one row of maps: a shorter label, as tall as the bar
    return fig


#: The most latent frames a frame strip shows (evenly picked, the first and last kept, when a video has more).
MAX_FRAME_COLUMNS = 12


def plot_frames(frames: Mapping[str, Mapping[str, tuple]], max_columns: int = MAX_FRAME_COLUMNS):
    """A video's heat map per latent frame: one strip per concept and row (variant), one panel per latent frame.

    Args:
        frames: ``{concept: {row: (maps, stills, record)}}``: ``maps`` ``[qt, h, w]`` (the requested mention's
            attention per latent frame), ``stills`` ``[qt, H, W, 3]`` uint8 (per latent frame, the decoded frame in
            the middle of those it shows; drawn in grey under the map) or ``None``, ``record`` the cell's frame record
            (``attnprobe.study.video.frame_record``: ``spans``, per latent frame its decoded frames) or ``None``.
        max_columns: the most latent frames shown; more are picked evenly, the first and last kept. Default 12.

    Returns:
        The figure. Each strip is scaled by the minimum and maximum over its own frames, so that frames compare within a
        strip (the level is in the trajectories).
    """
    plt = _plt()
    lines = [(c, v) for c in frames for v in frames[c]]
    qt = max(np.asarray(frames[c][v][0]).shape[0] for c, v in lines)
    shown = sorted({round(i * (qt - 1) / (max_columns - 1)) for i in range(max_columns)}) if qt > max_columns else list(range(qt))
    fig, axes = plt.subplots(len(lines), len(shown), figsize=(1.5 * len(shown) + 1.6, 1.5 * len(lines) + 0.3),
                             squeeze=False, layout="constrained")
    im = None
    for i, (c, v) in enumerate(lines):
        maps, stills, record = frames[c][v]
        maps = np.asarray(maps, dtype=float)
        finite = np.isfinite(maps)
        low = maps[finite].min() if finite.any() else 0.0
        span = (maps[finite].max() - low) if finite.any() else 0.0
        spans = (record or {}).get("spans") or [None] * maps.shape[0]
        for j, t in enumerate(shown):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if t >= maps.shape[0]:
                ax.set_visible(False)
                continue
            extent = None
            if stills is not None:
                img = np.asarray(stills[t])
                extent = (0, img.shape[1], img.shape[0], 0)
                grey = img[..., :3].mean(axis=-1).astype(float) / max(float(img.max()), 1e-9)
                ax.imshow(0.3 + 0.7 * grey, cmap="gray", vmin=0, vmax=1, extent=extent)
            m = np.where(finite[t], (maps[t] - low) / span if span > 0 else 0.0, np.nan)
            im = ax.imshow(m, cmap="viridis", alpha=0.6 if stills is not None else 1.0, vmin=0, vmax=1, extent=extent)
            if i == 0:
                where = spans[t] if t < len(spans) else None
                frames_of = "" if where is None else (f"\nframe {where[0]}" if where[0] == where[1]
                                                       else f"\nframes {where[0]}–{where[1]}")
                ax.set_title(f"latent {t}{frames_of}", fontsize=7)
            if j == 0:
                ax.set_ylabel(textwrap.fill(f"{c}: {v}", 22, max_lines=3, placeholder="…"), fontsize=7)
    if im is not None:
        bar = fig.colorbar(im, ax=axes, shrink=min(0.8, 3.0 / len(lines) + 0.2))
        bar.set_label("attention (min–max over\neach strip's frames)", fontsize=8)
    return fig


def plot_text_similarity(rows: Sequence[Mapping], value: str = "concept_cos_last", cols: int = 5):
    """Per concept and text encoder, the concept-token similarity to the baseline across the encoder's layers,
    one line per variant (1 = unchanged; the repetition control shows what naming the concept twice does).

    Args:
        rows: ``attnprobe.text.similarity_rows`` rows. value: the column to plot. Default ``concept_cos_last``
            (the last mention, as the study's headline).
        cols: panels per row; each encoder gets its own block of rows.

    Returns:
        The figure.
    """
    plt = _plt()
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    encoders = list(dict.fromkeys(r["encoder"] for r in rows if r["encoder"] != "conditioning"))
    colours = _colours(r["variant"] for r in rows)
    cols = max(1, min(cols, len(concepts)))
    per_encoder = math.ceil(len(concepts) / cols)
    fig, axes = plt.subplots(len(encoders) * per_encoder, cols, figsize=(3.0 * cols + 0.5, 2.4 * len(encoders) * per_encoder + 0.8),
                             squeeze=False, sharey=True)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, encoder in enumerate(encoders):
        for j, concept in enumerate(concepts):
            ax = axes[i * per_encoder + j // cols, j % cols]
            ax.set_visible(True)
            mine = [r for r in rows if r["concept"] == concept and r["encoder"] == encoder]
            for variant in dict.fromkeys(r["variant"] for r in mine):
                if variant == "baseline":
                    continue
                pts = sorted((r["layer"], r[value]) for r in mine if r["variant"] == variant)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=variant,
                        color=colours[variant])
            ax.axhline(1.0, color="black", lw=0.8)
            ax.xaxis.get_major_locator().set_params(integer=True)
            layers = sorted({r["layer"] for r in mine})
            if len(layers) == 1:  # a 0-layer encoder (the shapes model): the embeddings only
                ax.set_xticks(layers)
                ax.set_xlim(layers[0] - 0.5, layers[0] + 0.5)
            ax.grid(alpha=0.3)
            ax.set_title(shorten(f"{concept} ({encoder})" if len(encoders) > 1 else concept, 30), fontsize=9)
            ax.set_xlabel("layer (0 = embeddings)", fontsize=7)
            if j % cols == 0:
                ax.set_ylabel("cosine to baseline", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(1, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("Does the text encoder change the concept? Last mention vs the baseline's\n"
                 "(layer 0 already differs: the position embeddings of other positions)", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig


def plot_site_call_grid(store, concept: str, sample: int = 0, calls=None, max_calls: int = 6, occurrence="all"):
    """A grid of one concept's maps: rows are sites (execution order), columns denoiser calls.

    Each panel is the attention on the concept's tokens (summed over them, averaged over heads, and over latent
    frames for a video store) at that site and call, on the site's own ``qh × qw`` grid; one colour scale for all
    panels.

    Args:
        store: an ``AttentionStore``. concept, sample, occurrence: as for ``attnprobe.trajectory``.
        calls: call indices to show. Default: ``max_calls`` evenly spaced calls.

    Returns:
        The figure (axes titled ``call c (t=…)``, rows labelled with the site's block).

    Raises:
        ArgumentTypeError: ``store`` is not an ``AttentionStore``. StoreError: a store of ``probe(aggregate=...)``.
    """
    require_store(store, "plot_site_call_grid")
    require_per_call(store, "plot_site_call_grid")
    plt = _plt()
    positions = concept_positions(store, concept, sample, occurrence)
    n = len(store.calls)
    if calls is None:
        shown = min(max_calls, n)  # evenly spaced from the first call to the last
        calls = sorted({round(i * (n - 1) / max(1, shown - 1)) for i in range(shown)})
    sites = [s for s in store.sites if s.name not in store.flat_sites]
    # [call, 1, head, qh, qw] → [call, qh, qw]; a video store's [call, 1, head, qt, qh, qw]: the mean over frames too
    picked = {s.name: store.maps(s.name, calls=list(calls), samples=[sample], tokens=positions).float().sum(-1)
              for s in sites}
    grids = {n: g.mean(dim=(1, 2) if g.ndim == 5 else (1, 2, 3)).numpy() for n, g in picked.items()}
    vmax = max(float(g.max()) for g in grids.values()) if grids else 1.0
    fig, axes = plt.subplots(len(sites), len(calls), figsize=(1.1 * len(calls) + 1.5, 1.1 * len(sites) + 0.8),
                             squeeze=False, layout="constrained")
    im = None
    for i, site in enumerate(sites):
        for j, call in enumerate(calls):
            ax = axes[i, j]
            im = ax.imshow(grids[site.name][j], cmap="viridis", vmin=0, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"call {call}\n(t={store.calls[call].timestep:g})", fontsize=7)
            if j == 0:
                label = site.name.replace(".transformer_blocks.0.attn2", "").replace("attentions.", "a")
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.5, label=f"attention on {concept!r}")
    return fig


def plot_contrasts(rows: Sequence[Mapping], measures: Mapping[str, str] | None = None):
    """A forest plot of paired contrasts: per measure a panel, per concept and contrast (``variant − reference``) the
    mean difference over seeds with its 95% interval, and the Holm-adjusted p-value beside it.

    Args:
        rows: ``contrasts.csv`` rows (``attnprobe.study.contrasts.contrast_rows``): ``measure``, ``concept``,
            ``variant``, ``reference``, ``n``, ``mean``, ``ci_low``, ``ci_high``, ``p_holm``, ``test``.
        measures: ``{measure column: title}``; default: every measure in ``rows``, titled by its column.

    Returns:
        The figure.
    """
    plt = _plt()
    measures = measures or {m: m for m in dict.fromkeys(r["measure"] for r in rows)}
    shown = [m for m in measures if any(r["measure"] == m and math.isfinite(float(r["mean"])) for r in rows)]
    shown = shown or list(measures)[:1]
    pairs = list(dict.fromkeys((r["variant"], r["reference"]) for r in rows))
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    colours = _colours([f"{a} − {b}" for a, b in pairs])
    height = 0.32 * len(pairs) * max(1, len(concepts)) + 1.2
    fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown) + 1.5, height), squeeze=False)
    for ax, measure in zip(axes[0], shown):
        labels, y = [], 0
        for concept in concepts:
            for a, b in pairs:
                r = next((r for r in rows if (r["measure"], r["concept"], r["variant"], r["reference"]) ==
                          (measure, concept, a, b)), None)
                if r is None:
                    continue
                mean, lo, hi = (float(r[k]) for k in ("mean", "ci_low", "ci_high"))
                err = [[_err_length(mean, lo)], [_err_length(hi, mean)]]
                ax.errorbar([mean], [y], xerr=err, fmt="o", color=colours[f"{a} − {b}"], capsize=3, ms=4)
                p = float(r["p_holm"])
                if math.isfinite(p):
                    ax.annotate(f"p={p:.2g} (n={r['n']})", (1.0, y), xycoords=("axes fraction", "data"),
                                xytext=(4, 0), textcoords="offset points", va="center", fontsize=7)
                labels.append(f"{shorten(concept, 18)}: {a} − {b}")
                y += 1
            y += 0.5
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks([i + 0.5 * (i // max(1, len(pairs))) for i in range(len(labels))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(textwrap.fill(f"{measures[measure]}: paired difference (mean over seeds, 95% CI; "
                                   "p: Holm across concepts)", 60), fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout(w_pad=7)  # room for the p labels right of each panel before the next one's row labels
    return fig


def _site_label(name: str) -> str:
    """A short site name for an axis: ``down_blocks.1.attentions.0.transformer_blocks.0.attn2`` → ``down1.a0.t0``."""
    for long, short in (("transformer_blocks.", "t"), ("_blocks.", ""), ("_block.", ""), ("attentions.", "a"),
                        ("blocks.", "b"), ("layers.", "l")):
        name = name.replace(long, short)
    return name.removesuffix(".attn2").removesuffix(".attn").removesuffix(".attention")


def plot_where_when(rows: Sequence[Mapping], title: str | None = None, max_concepts: int = 3):
    """Where and when attention on the requested mention changes: per row of the study (columns), a sites × denoiser
    calls grid of the mean Δ over seeds (row − baseline of the same seed), sites in execution order with their query
    grid, a line between sites of different grids; the top row of panels is the mean over concepts, then one row per
    concept when there are at most ``max_concepts``. Each column has its own colour scale centred at 0 (an
    intervention's change would wash out a variant's).

    Args:
        rows: ``where_when.csv`` rows (``attnprobe.study.contrasts.where_when_rows``).
        title: above the panels. max_concepts: the most concepts shown one by one (``where_when.csv`` has them all).

    Returns:
        The figure.
    """
    plt = _plt()
    concepts = list(dict.fromkeys(r["concept"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    sites = sorted({(int(r["site_order"]), r["site"], r["grid"]) for r in rows})
    calls = 1 + max((int(r["call"]) for r in rows), default=0)
    grids = {}
    for r in rows:
        grid = grids.setdefault((r["concept"], r["variant"]), np.full((len(sites), calls), np.nan))
        grid[int(r["site_order"]), int(r["call"])] = float(r["mean"])
    shown = ["mean over concepts" if len(concepts) > 1 else concepts[0]]
    for v in variants:
        stack = [grids[c, v] for c in concepts if (c, v) in grids]
        grids[shown[0], v] = np.nanmean(np.stack(stack), axis=0) if len(stack) > 1 else stack[0]
    if 1 < len(concepts) <= max_concepts:
        shown += concepts
    width = min(1.6 + 0.1 * calls, 5.0)
    fig, axes = plt.subplots(len(shown), len(variants), squeeze=False, constrained_layout=True,
                             figsize=(width * len(variants) + 1.6, 0.13 * len(sites) * len(shown) + 1.4))
    for j, v in enumerate(variants):
        values = [np.nanmax(np.abs(grids[c, v])) for c in shown if (c, v) in grids and np.isfinite(grids[c, v]).any()]
        vmax = max(values) if values and max(values) > 0 else 1.0
        for i, c in enumerate(shown):
            ax = axes[i, j]
            image = ax.imshow(grids.get((c, v), np.full((len(sites), calls), np.nan)), aspect="auto", cmap="RdBu_r",
                              vmin=-vmax, vmax=vmax, interpolation="nearest")
            for k in range(1, len(sites)):
                if sites[k][2] != sites[k - 1][2]:
                    ax.axhline(k - 0.5, color="black", lw=0.5)
            ax.set_title(f"{shorten(v, 24)} − baseline\n{shorten(c, 30)}", fontsize=7)
            ax.set_xticks(range(0, calls, max(1, calls // 6)))
            ax.tick_params(axis="x", labelsize=6)
            if j == 0:
                ax.set_yticks(range(len(sites)), [f"{_site_label(s[1])} {s[2]}" for s in sites], fontsize=5)
            else:
                ax.set_yticks([])
            if i == len(shown) - 1:
                ax.set_xlabel("denoiser call", fontsize=7)
        bar = fig.colorbar(image, ax=axes[:, j], location="bottom", shrink=0.9, aspect=25)
        bar.ax.tick_params(labelsize=6)
        bar.set_ticks([-vmax, 0, vmax], labels=[f"{-vmax:.2g}", "0", f"{vmax:.2g}"])
        bar.set_label("Δ attention", fontsize=6)
    if title:
        fig.suptitle(textwrap.fill(title, 30 + int(22 * width * len(variants))), fontsize=8)
    return fig
