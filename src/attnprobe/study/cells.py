"""A study's grid as cells: each finished cell a shard, a manifest of finished work, resume, and the merge's reading.

A study's grid is split into **cells**: one *generation cell* per (model, concept, seed) — one pipeline call for
every prompt variant plus one per intervention row — and one *text cell* per (model, concept) for the text
encoder's side. Each finished cell is written to its own **shard** (``cells/<model>/<concept>/<seed or text>
.safetensors``: the cell's rows as JSON metadata, its heat maps and first-seed images as tensors) under a temporary
name and then renamed, and recorded in its process's **manifest** (``manifest/process-<rank>.json``: file, size and
SHA-256 per finished cell, rewritten atomically after each cell). A run that starts again reads every manifest and
skips the cells whose shard is intact; a missing, truncated or altered shard is redone. No two processes write one
file: each process writes only its own cells' shards and its own manifest.

Processes: launched by ``accelerate launch`` (or ``torchrun``), the processes agree through accelerate's
``PartialState`` (``WORLD_SIZE`` > 1): they read the manifests, wait for each other, and each takes every
``world``-th pending cell (whole generations); when all have finished, the main process merges every shard of the
grid into the tables and figures, so that the outputs equal those of one process (same seeds, same numbers).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .._atomic import write_atomic
from ..errors import StoreError

__all__ = ["Cell", "grid", "Manifest", "write_cell", "read_cell", "collect", "settings_key", "slug"]

_RECORD = "attnprobe.cell"


def slug(text: str) -> str:
    """A file-name-safe, collision-free name: readable part plus a short hash of the exact text."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-.")[:40] or "x"
    return f"{readable}-{hashlib.sha1(str(text).encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Cell:
    """One unit of work of a study: a generation (``seed`` set) or the text analysis (``seed`` is ``None``)."""

    model: str
    concept: str
    seed: int | None = None

    @property
    def kind(self) -> str:
        return "text" if self.seed is None else "generation"

    @property
    def id(self) -> str:
        """The cell's shard path inside ``cells/`` without suffix, e.g. ``tiny-…/dog-…/seed0``."""
        return f"{slug(self.model)}/{slug(self.concept)}/{'text' if self.seed is None else f'seed{self.seed}'}"

    def describe(self) -> str:
        what = "text analysis" if self.seed is None else f"seed {self.seed}"
        return f"model {self.model!r}, concept {self.concept!r}, {what}"


def grid(models, concepts, seeds) -> list[Cell]:
    """The cells of a study in their fixed order: per model, every concept × seed, then the text cells."""
    cells = []
    for model in models:
        cells += [Cell(model, c, int(s)) for c in concepts for s in seeds]
        cells += [Cell(model, c) for c in concepts]
    return cells


def shard_path(out: Path, cell: Cell) -> Path:
    """Where a cell's shard lives: ``out/cells/<model>/<concept>/<seed N or text>.safetensors``."""
    return Path(out) / "cells" / f"{cell.id}.safetensors"


def write_cell(out: Path, cell: Cell, record: dict, tensors: dict[str, torch.Tensor] | None = None,
               settings: str | None = None) -> dict:
    """Write a finished cell's shard atomically; returns its manifest entry (file, bytes, sha256, the settings key,
    and ``complete``: no row of the cell failed)."""
    from safetensors.torch import save

    path = shard_path(out, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()}
    record = {**record, "cell": {"model": cell.model, "concept": cell.concept, "seed": cell.seed}}
    data = save(tensors, metadata={_RECORD: json.dumps(record, allow_nan=True)})
    write_atomic(path, data)
    return {"file": str(path.relative_to(out)), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "settings": settings, "complete": not record.get("failures")}


def read_cell(out: Path, entry: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A shard's record and tensors.

    Raises:
        StoreError: the file is not a readable cell shard (the caller redoes the cell).
    """
    from safetensors.torch import load

    data = (Path(out) / entry["file"]).read_bytes()
    try:
        size = int.from_bytes(data[:8], "little")
        record = json.loads(json.loads(data[8:8 + size])["__metadata__"][_RECORD])
        tensors = load(data)
    except Exception as exc:
        raise StoreError(f"{entry['file']} is not a readable cell shard ({type(exc).__name__}: {exc})") from None
    return record, tensors


def _problem(out: Path, cell: Cell, entry, settings: str | None) -> str | None:
    """Why a manifest entry's shard cannot be trusted for ``cell``, or ``None`` when it is intact."""
    if not isinstance(entry, dict):
        return "its manifest entry is not a record"
    if entry.get("file") != str(shard_path(out, cell).relative_to(out)):
        return f"its manifest entry names another file ({str(entry.get('file'))[:80]!r})"
    if settings is not None and entry.get("settings") != settings:
        return "it was measured with other settings"
    path = shard_path(out, cell)
    if not path.is_file():
        return "its shard is missing"
    if path.stat().st_size != entry.get("bytes"):
        return f"its shard has {path.stat().st_size} bytes, the manifest says {entry.get('bytes')} (truncated?)"
    if hashlib.sha256(path.read_bytes()).hexdigest() != entry.get("sha256"):
        return "its shard's checksum differs from the manifest's (changed after it was written)"
    return None


class Manifest:
    """The finished cells of a study folder: every process's ``manifest/process-<rank>.json`` together.

    Each process rewrites only its own file (atomically), keeping the entries an earlier run of the same rank wrote.
    A cell may be listed by several files (redone by another process, or by a later run): it counts as finished when
    any entry matches its shard as it is now (file, size and SHA-256) and the study's settings.

    Args:
        out: the study folder. rank: this process's rank (the file it writes).
        settings: the key of the study's settings (``settings_key``); entries with another key are not finished.
            Default ``None``: not checked.
        warn: called with a message for an unreadable manifest file. Default: none.
    """

    def __init__(self, out: Path, rank: int = 0, settings: str | None = None, warn=None) -> None:
        self.out = Path(out)
        self.folder = self.out / "manifest"
        self.own = self.folder / f"process-{rank}.json"
        self.settings = settings
        self.warn = warn
        self.mine: dict[str, dict] = self._read(self.own)

    def _read(self, path: Path) -> dict:
        try:
            cells = json.loads(path.read_text())["cells"]
            if not isinstance(cells, dict):
                raise StoreError("its cells are not a table")
            return dict(cells)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, StoreError) as exc:  # written atomically: damaged from outside
            if self.warn is not None:
                self.warn(f"ignoring the unreadable manifest {str(path)!r} ({type(exc).__name__}: {exc}); "
                          "the cells it listed are redone")
            return {}

    def entries(self) -> dict[str, list]:
        """Every manifest entry per cell id, from every process's file."""
        found: dict[str, list] = {}
        paths = sorted(self.folder.glob("process-*.json")) if self.folder.is_dir() else []
        for path in paths:
            for cell_id, entry in (self.mine if path == self.own else self._read(path)).items():
                found.setdefault(cell_id, []).append(entry)
        return found

    def finished(self, cells, warn=None, complete: bool = True) -> dict[str, dict]:
        """``{cell id: entry}`` for the cells of ``cells`` whose shard is intact (and, with ``complete``, none of whose
        rows failed); ``warn(message)`` for the cells listed whose shard cannot be trusted (they are redone)."""
        entries = self.entries()
        done = {}
        for cell in cells:
            problems = []
            for entry in entries.get(cell.id, []):
                why = _problem(self.out, cell, entry, self.settings)
                if why is None and (entry.get("complete", True) or not complete):
                    done[cell.id] = entry
                    break
                problems.append(why or "some of its rows failed")
            else:
                if problems and warn is not None:
                    warn(f"redoing {cell.describe()}: {problems[-1]}")
        return done

    def record(self, cell: Cell, entry: dict) -> None:
        """Add a finished cell and rewrite this process's manifest atomically."""
        self.mine[cell.id] = entry
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.own, json.dumps({"cells": self.mine}, indent=0).encode())


def settings_key(settings: dict) -> str:
    """A short hash of a study's settings (what every finished cell was measured with)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def collect(out: Path, cells, seeds, result, scorer_name=None, settings: str | None = None) -> dict[str, dict]:
    """Fill ``result`` (a ``StudyResult``) with the rows of every finished cell of ``cells``, in grid order, and the
    failures of the others; returns per model the figure data: ``curves`` per concept and row, and the heat maps and
    images of each concept's first finished seed (in the order of ``seeds``). A ``result`` with a ``browser`` list gets
    one entry per finished generation for report.html (``page.py``): its rows, sites, timesteps and small tensors."""
    import numpy as np

    out = Path(out)
    finished = Manifest(out, settings=settings).finished(cells, complete=False)
    figures: dict[str, dict] = {}
    for cell in cells:
        fig = figures.setdefault(cell.model, {"images": {}, "maps": {}, "curves": {}, "scorer": scorer_name,
                                              "frames": {}})
        entry = finished.get(cell.id)
        record, seed = None, "text" if cell.seed is None else cell.seed
        if entry is not None:
            try:
                record, tensors = read_cell(out, entry)
                if record.get("cell") != {"model": cell.model, "concept": cell.concept, "seed": cell.seed}:
                    raise StoreError(f"it holds another cell ({record.get('cell')})")
            except StoreError as exc:
                record = None
                result.failures.append(dict(model=cell.model, concept=cell.concept, seed=seed,
                                            error=f"StoreError: {exc}", detail=""))
        if record is None:
            failure = out / "failed" / f"{cell.id}.json"
            try:
                result.failures.append({**json.loads(failure.read_text()), "model": cell.model,
                                        "concept": cell.concept, "seed": seed})
                result.failed += cell.kind == "generation"
            except (OSError, ValueError, TypeError):
                pass
            continue
        result.failures += [{**f, "model": cell.model} for f in record.get("failures", [])]
        if cell.kind == "text":
            result.text += record["text"]
            continue
        result.done += 1
        result.partial += bool(record.get("failures"))  # done, with a failed row or measure (its rows are kept)
        result.trajectories += record["trajectories"]
        result.aucs += record["aucs"]
        if record.get("video") and hasattr(result, "videos"):  # a video model's cells: which frames stand for a video
            result.videos.setdefault(cell.model, record["video"])
        where = result.where_when_data.setdefault((cell.model, cell.concept), {"sites": None, "rows": {}})
        for k, row in enumerate(record["rows"]):
            curve = [r["mass_last"] for r in record["trajectories"] if r["variant"] == row]
            fig["curves"].setdefault(cell.concept, {}).setdefault(row, []).append(np.asarray(curve, dtype=np.float64))
            if f"sites.{k}" in tensors and where["sites"] in (None, record.get("sites")):  # cells of older runs: none
                where["sites"] = record.get("sites")
                where["rows"].setdefault(row, {})[cell.seed] = tensors[f"sites.{k}"].double().numpy()
        if hasattr(result, "browser"):  # report.html's heat-map browser: every cell's small maps and images
            keep = ("image", "sitemaps", "callmaps", "sitecalls", "framemaps", "frameimages") if "sitemaps.0" in tensors \
                else ("image", "map")
            timesteps = {r["call"]: r["timestep"] for r in record["trajectories"]}
            result.browser.append(dict(model=cell.model, concept=cell.concept, seed=cell.seed, rows=record["rows"],
                                       sites=record.get("map_sites") or [], video=record.get("video"),
                                       timesteps=[timesteps[c] for c in sorted(timesteps)],
                                       tensors={k: v for k, v in tensors.items() if k.split(".")[0] in keep}))
        shown = fig.setdefault("shown", set())
        if cell.concept not in shown:  # the concept's first finished seed, named on its row of the figure
            from PIL import Image

            shown.add(cell.concept)
            label = f"{cell.concept} (seed {cell.seed})"
            for k, row in enumerate(record["rows"]):
                if f"map.{k}" in tensors:
                    fig["maps"].setdefault(label, {})[row] = tensors[f"map.{k}"].numpy()
                if f"image.{k}" in tensors:
                    fig["images"].setdefault(label, {})[row] = Image.fromarray(tensors[f"image.{k}"].numpy())
                if f"framemaps.{k}" in tensors:  # a video: per latent frame, its map (and its decoded frame)
                    still = tensors.get(f"frameimages.{k}")
                    fig["frames"].setdefault(label, {})[row] = (
                        tensors[f"framemaps.{k}"].float().numpy(), None if still is None else still.numpy(),
                        record.get("video"))
    return figures
