"""AttentionStore: the recorded cross-attention maps of one probe, with their coordinates.

    >>> from attnprobe.testing import synthetic_store
    >>> store = synthetic_store(calls=3, grid=(2, 4))
    >>> site = store.sites[0].name
    >>> tuple(store[site].shape)        # [call, sample, head, qh, qw, token]
    (3, 1, 2, 2, 4, 77)

Per site, ``store[site]`` is ``[call, sample, head, qh, qw, token]``: for denoiser call ``c`` and captured
sample ``s``, the probability that image position ``(qh, qw)`` of head ``h`` attends to text token ``t``.
Values sum to 1 over ``token``. ``head`` has length 1 when heads were averaged (``heads="mean"``). Sites whose
query count does not factor into the latent grid (token merging) are kept flat: ``qh = 1``, ``qw = query``,
listed in ``store.flat_sites``.

Capture-time reductions change two axes, and say so: with ``probe(tokens=...)`` the ``token`` axis holds only
the kept positions (``store.token_positions``; their values are their share of the full softmax, so they no
longer sum to 1); with ``probe(aggregate="mean")`` the ``call`` axis has length 1 and holds the mean over
``store.calls`` (``store.aggregate``). A store streamed to a folder (``probe(stream_to=...)``) reads its maps
from disk on each access (``store.maps`` reads only what it is asked for).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import shards
from .errors import ConceptError, SelectionError, StoreError, UnknownSiteError
from .sites import Site
from .tokens import TokenLayout, find_concept

__all__ = ["AttentionStore", "Call", "Sample", "FORMAT_VERSION"]

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}

FORMAT_VERSION = 1
_META_KEY = "attnprobe"


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def as_index(value) -> int | None:
    """``value`` as a Python int if it is an integer — a Python, numpy or 0-d torch integer, never a bool — else None."""
    import numbers

    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and value.dtype in (torch.int8, torch.uint8, torch.int16,
                                                                               torch.int32, torch.int64):
        return int(value)
    return None


def _positions(axis: str, chosen, length: int) -> list[int] | None:
    """``chosen`` (None, an int, a slice or a sequence of ints; numpy ints too) as a list of non-negative positions
    on an axis.

    Raises:
        SelectionError: a position out of range (an ``IndexError``). TypeError: not ints (bools are not positions).
    """
    if chosen is None:
        return None
    if isinstance(chosen, slice):
        return list(range(length))[chosen]
    if as_index(chosen) is not None:
        chosen = [chosen]
    try:
        items = list(chosen.tolist() if isinstance(chosen, (np.ndarray, torch.Tensor)) else chosen)
    except TypeError:
        raise TypeError(f"{axis} positions must be an int, a slice or a list of ints; got {chosen!r}") from None
    chosen = [as_index(i) for i in items]
    if None in chosen:
        raise TypeError(f"{axis} positions must be ints; got {items!r}")
    if any(not -length <= i < length for i in chosen):
        raise SelectionError(f"{axis} positions {chosen} are out of range: the {axis} axis has {length} entries")
    return [i % length for i in chosen]


@dataclass(frozen=True)
class Call:
    """One denoiser call.

    Attributes:
        index: call index from 0, counted by a pre-forward hook on the denoiser (Heun makes 2 per step).
        timestep: the scheduler timestep the denoiser got (its first element when it is per sample).
        generation: which pipeline call (0 for the first) within the probe.
        layout: the pass label of every batch row of the call, e.g. ``("uncond", "uncond", "cond", "cond")``.
    """

    index: int
    timestep: float
    generation: int
    layout: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    """One captured batch row (the ``sample`` axis of the maps).

    Attributes:
        index: position on the ``sample`` axis.
        pass_label: ``"cond"`` or ``"uncond"`` (classifier-free guidance's conditional / unconditional pass).
        prompt_index: which prompt of the pipeline call (``prompt[i]`` or ``negative_prompt[i]``).
        image_index: which image of that prompt (``num_images_per_prompt``).
        row: the batch row in the denoiser call.
        text: the prompt text, or ``None`` when unknown (``prompt_embeds`` passed).
    """

    index: int
    pass_label: str
    prompt_index: int
    image_index: int
    row: int
    text: str | None


class AttentionStore:
    """Cross-attention maps keyed by site, with call, sample and token coordinates.

    Built by ``attnprobe.probe``; loaded by ``AttentionStore.load``. Attributes: ``sites`` (``list[Site]``,
    execution order), ``calls`` (``list[Call]``), ``samples`` (``list[Sample]``), ``meta`` (dict: pipeline and
    denoiser class, versions, scheduler, timesteps, prompts, image size, capture options), ``flat_sites``.
    """

    def __init__(self, sites, calls, samples, layouts, maps, meta, flat_sites=(), token_positions=None, folder=None):
        self.sites: list[Site] = list(sites)
        self.calls: list[Call] = list(calls)
        self.samples: list[Sample] = list(samples)
        self.meta: dict = dict(meta)
        self.flat_sites: set[str] = set(flat_sites)
        #: the prompt positions on the ``token`` axis (``probe(tokens=...)``), or ``None`` for all positions
        self.token_positions: list[int] | None = list(token_positions) if token_positions is not None else None
        self._layouts: list[TokenLayout] = list(layouts)
        self._chunks: dict[str, list[torch.Tensor]] = {s.name: [] for s in self.sites}
        self._maps: dict[str, torch.Tensor] = dict(maps)
        self._folder: Path | None = Path(folder) if folder is not None else None
        self._shards: list[Path] = []  # a streamed store's finished shards, one per entry of self.calls

    @property
    def aggregate(self) -> str | None:
        """``"sum"`` or ``"mean"`` when the call axis holds one aggregate over ``calls`` (``probe(aggregate=)``)."""
        return (self.meta.get("capture") or {}).get("aggregate")

    @property
    def folder(self) -> Path | None:
        """The folder a streamed store lives in (``probe(stream_to=...)``), else ``None``."""
        return self._folder

    # ------------------------------------------------------------------ access
    @property
    def site_names(self) -> list[str]:
        """Names of the captured sites, in execution order."""
        return [s.name for s in self.sites]

    def _site_name(self, site) -> str:
        name = site.name if isinstance(site, Site) else site
        if name not in self._chunks and name not in self._maps:
            shown = "\n  ".join(self.site_names[:40])
            raise UnknownSiteError(f"site {name!r} is not in this store; its {len(self.sites)} sites are:\n  {shown}")
        return name

    def __getitem__(self, site) -> torch.Tensor:
        """``[call, sample, head, qh, qw, token]`` probabilities of one site (``Site`` or its name).

        Raises:
            UnknownSiteError (a KeyError): the site is not in the store (the message lists the sites).
        """
        name = self._site_name(site)
        if self._folder is not None:
            return shards.read_site(self._shards, name)
        chunks = self._chunks.get(name)
        if chunks:
            prior = [self._maps[name]] if name in self._maps else []
            self._maps[name] = torch.cat(prior + [torch.stack(chunks)], dim=0)
            chunks.clear()
        if name not in self._maps:
            return torch.empty(0)
        return self._maps[name]

    def maps(self, site, calls=None, samples=None, tokens=None) -> torch.Tensor:
        """A slice of one site's maps: ``[call, sample, head, qh, qw, token]`` for the chosen entries.

        Reads only what it returns from a streamed store (token rows of each chosen call's shard).

        Args:
            site: a site name or ``Site``.
            calls: positions on the ``call`` axis (an int, a slice or a list of ints). Default: all.
            samples: positions on the ``sample`` axis (same forms). Default: all.
            tokens: positions on the ``token`` axis (e.g. from ``token_indices``; same forms). Default: all.

        Raises:
            UnknownSiteError: no such site. SelectionError: a position out of range (says the axis length).
            TypeError: positions that are not ints.

        Examples:
            >>> from attnprobe.testing import synthetic_store
            >>> store = synthetic_store(calls=4)
            >>> tuple(store.maps(store.sites[0], calls=[0, 3], tokens=[2]).shape)
            (2, 1, 2, 2, 2, 1)
        """
        name = self._site_name(site)
        out = self[name] if self._folder is None else None
        n_calls = len(self._shards) if out is None else (out.shape[0] if out.numel() else 0)
        calls = _positions("call", calls, n_calls)
        samples = _positions("sample", samples, len(self.samples))
        tokens = _positions("token", tokens, self.n_tokens)
        if out is None:
            paths = self._shards if calls is None else [self._shards[i] for i in calls]
            return shards.read_site(paths, name, samples, tokens)
        if calls is not None:
            out = out[calls]
        if samples is not None:
            out = out[:, samples]
        if tokens is not None:
            out = out[..., tokens]
        return out

    @property
    def n_tokens(self) -> int:
        """Length of the ``token`` axis."""
        if self.token_positions is not None:
            return len(self.token_positions)
        return len(self._layouts[0].strings) if self._layouts else 0

    def __contains__(self, site) -> bool:
        name = site.name if isinstance(site, Site) else site
        return name in self._chunks or name in self._maps

    def __iter__(self):
        return iter(self.site_names)

    def __len__(self) -> int:
        return len(self.sites)

    def _append(self, site: str, maps: torch.Tensor) -> None:
        self._chunks[site].append(maps)

    def _consolidate(self) -> None:
        for name in self.site_names:
            self[name]

    @property
    def nbytes(self) -> int:
        """Bytes of the maps (kept values × dtype size); for a streamed store, the bytes of its shards' maps."""
        if self._folder is not None:
            total = 0
            for path in self._shards:
                _, shapes, dtypes = shards.read_shard_call(path)
                total += sum(math.prod(shape) * _DTYPE_BYTES.get(dtypes[n], 4) for n, shape in shapes.items())
            return total
        total = sum(t.numel() * t.element_size() for t in self._maps.values())
        total += sum(t.numel() * t.element_size() for ch in self._chunks.values() for t in ch)
        return total

    def _sample_index(self, sample) -> int:
        idx = sample.index if isinstance(sample, Sample) else as_index(sample)
        if idx is None or not -len(self.samples) <= idx < len(self.samples):
            listing = "\n  ".join(
                f"{s.index}: {s.pass_label} prompt {s.prompt_index} image {s.image_index}: {s.text!r}" for s in self.samples
            )
            raise SelectionError(f"sample {sample!r} is not in this store; its {len(self.samples)} samples are:\n  {listing}")
        return idx % len(self.samples)  # -1: the last sample

    def layout(self, sample) -> TokenLayout:
        """The token layout of a sample (strings, kinds, ids, text, offsets)."""
        return self._layouts[self._sample_index(sample)]

    def _kept(self, values: list) -> list:
        return list(values) if self.token_positions is None else [values[p] for p in self.token_positions]

    def tokens(self, sample) -> list[str]:
        """The string of every position on the ``token`` axis for a sample: ``<|startoftext|>``, words,
        ``<|endoftext|>``, padding (only the kept positions after ``probe(tokens=...)``).

        Positions whose text is unknown (``prompt_embeds`` passed) are ``""``. Length = the ``token`` axis.
        """
        return self._kept(self.layout(sample).strings)

    def token_kinds(self, sample) -> list[str]:
        """Per position on the ``token`` axis ``"start"``, ``"word"``, ``"end"``, ``"pad"`` or ``"unknown"``."""
        return self._kept(self.layout(sample).kinds)

    def token_indices(self, sample, concept: str) -> list[list[int]]:
        """Positions of every occurrence of ``concept`` in a sample's prompt: one list per occurrence.

        Raises:
            ConceptError: not in the prompt (shows its tokens), truncated away, or the sample has no text.

        Examples:
            >>> from attnprobe.testing import synthetic_store
            >>> synthetic_store(prompt="a dog and a van gogh dog").token_indices(0, "dog")
            [[2], [7]]
        """
        idx = self._sample_index(sample)
        s = self.samples[idx]
        where = f"sample {idx} ({s.pass_label} pass, prompt {s.prompt_index})"
        found = find_concept(self._layouts[idx], concept, where=where)
        if self.token_positions is None:
            return found
        axis = {p: i for i, p in enumerate(self.token_positions)}
        kept = [[axis[p] for p in occ] for occ in found if all(p in axis for p in occ)]
        if not kept:
            raise ConceptError(
                f"{concept!r} is at prompt positions {found} of {where}, but this store kept only positions "
                f"{self.token_positions} (probe(tokens=...)): capture with tokens={concept!r} or tokens=None"
            )
        return kept

    def text_share(self, site) -> torch.Tensor:
        """The mean text share of a joint-attention site: ``[call, sample, head]`` float32, for each image position
        the probability mass its softmax over ``[image; text]`` keys gives the text keys (0–1), averaged over image
        positions (``head`` of length 1 with ``heads="mean"``). Recorded with ``probe(joint="exact")``; with every
        token kept (and no ``aggregate``: the share keeps every call) it equals ``store[site].sum(-1).mean((-2, -1))``.

        Raises:
            UnknownSiteError: not a site of the store. StoreError: a cross-attention site (all its mass is on text),
                or a store captured with ``joint="renorm"`` (which computes no text share).

        Examples:
            >>> from attnprobe.testing import tiny_sd3_pipeline
            >>> import attnprobe
            >>> pipe = tiny_sd3_pipeline()
            >>> with attnprobe.probe(pipe, heads="mean") as store:
            ...     _ = pipe("a dog", num_inference_steps=2, height=64, width=64, max_sequence_length=8, output_type="latent")
            >>> tuple(store.text_share(store.sites[0]).shape)
            (2, 1, 1)
        """
        name = self._site_name(site)
        shares = (self.meta.get("text_share") or {}).get(name)
        if shares is None:
            kind = next((s.kind for s in self.sites if s.name == name), "?")
            mode = (self.meta.get("capture") or {}).get("joint")
            raise StoreError(
                f"site {name} ({kind}) has no text share: only joint-attention sites (SD3, Flux) captured with "
                f"joint='exact' record one (this store: joint={mode!r})"
            )
        return torch.tensor(shares, dtype=torch.float32)

    def _call_coords(self) -> tuple[list, list, list]:
        """Per entry of the ``call`` axis: call index, timestep, generation (one entry ``-1, nan, -1`` for an
        aggregate over calls)."""
        if self.aggregate:
            return [-1], [float("nan")], [-1]
        return [c.index for c in self.calls], [c.timestep for c in self.calls], [c.generation for c in self.calls]

    # ------------------------------------------------------------------ export
    def to_xarray(self, site=None):
        """One site's maps as a labelled ``xarray.DataArray`` (needs the ``xarray`` extra).

        Dims ``call sample head qh qw token``; coordinates: ``timestep`` and ``generation`` per call,
        ``pass_label``, ``prompt_index``, ``image_index`` and ``text`` per sample, ``token_string`` per
        ``(sample, token)``. Values are probabilities (sum to 1 over ``token``).

        Args:
            site: a site name or ``Site``. Default: the first site in execution order.

        Examples:
            >>> from attnprobe.testing import synthetic_store
            >>> da = synthetic_store(calls=3).to_xarray()
            >>> da.dims, round(float(da.sum("token").mean()), 6)
            (('call', 'sample', 'head', 'qh', 'qw', 'token'), 1.0)
        """
        import xarray as xr

        name = self._site_name(site if site is not None else self.sites[0])
        maps = self[name]
        index, timestep, generation = self._call_coords()
        return xr.DataArray(
            maps.float().numpy(),
            dims=("call", "sample", "head", "qh", "qw", "token"),
            coords={
                "call": index,
                "timestep": ("call", timestep),
                "generation": ("call", generation),
                "sample": [s.index for s in self.samples],
                "pass_label": ("sample", [s.pass_label for s in self.samples]),
                "prompt_index": ("sample", [s.prompt_index for s in self.samples]),
                "image_index": ("sample", [s.image_index for s in self.samples]),
                "text": ("sample", [s.text or "" for s in self.samples]),
                "token": self.token_positions if self.token_positions is not None else list(range(maps.shape[-1])),
                "token_string": (("sample", "token"), [self.tokens(s.index) for s in self.samples]),
            },
            name=name,
            attrs={"site": name, "pipeline": str(self.meta.get("pipeline")), "denoiser": str(self.meta.get("denoiser"))},
        )

    def to_pandas(self):
        """A tidy ``pandas.DataFrame``: one row per call, sample, site and token position, with the token's
        attention mass there (averaged over heads and image positions; sums to 1 over a sample's tokens).

        Columns: ``call timestep generation sample pass_label prompt_index image_index site token token_string
        mass`` (``token``: the position in the prompt). Needs ``pandas``.

        Examples:
            >>> from attnprobe.testing import synthetic_store
            >>> df = synthetic_store(calls=2).to_pandas()
            >>> len(df), round(float(df.groupby(["call", "site"]).mass.sum().iloc[0]), 6)
            (154, 1.0)
        """
        import numpy as np
        import pandas as pd

        frames = []
        for site in self.site_names:
            mass = self[site].float().mean(dim=(2, 3, 4)).numpy()  # [call, sample, token]
            n_calls, n_samples, n_tokens = mass.shape
            call, sample, token = np.meshgrid(np.arange(n_calls), np.arange(n_samples), np.arange(n_tokens), indexing="ij")
            frames.append(pd.DataFrame({"call": call.ravel(), "sample": sample.ravel(), "site": site,
                                        "token": token.ravel(), "mass": mass.ravel()}))
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["call", "sample", "site", "token", "mass"])
        index, timestep, generation = self._call_coords()
        calls = pd.DataFrame({"call": index, "timestep": timestep, "generation": generation})
        samples = pd.DataFrame([{"sample": s.index, "pass_label": s.pass_label, "prompt_index": s.prompt_index,
                                 "image_index": s.image_index} for s in self.samples])
        strings = pd.DataFrame([{"sample": s.index, "token": t, "token_string": text}
                                for s in self.samples for t, text in enumerate(self.tokens(s.index))])
        df["call"] = df["call"].map(dict(enumerate(index)))
        df = df.merge(calls, on="call").merge(samples, on="sample").merge(strings, on=["sample", "token"])
        if self.token_positions is not None:  # the prompt position, as in to_xarray's token coordinate
            df["token"] = df["token"].map(dict(enumerate(self.token_positions)))
        return df[["call", "timestep", "generation", "sample", "pass_label", "prompt_index", "image_index", "site",
                   "token", "token_string", "mass"]]

    def __repr__(self) -> str:
        grids = sorted({tuple(self[n].shape[3:5]) for n in self.site_names if self[n].numel()})
        calls = f"the {self.aggregate} over {len(self.calls)} calls" if self.aggregate else f"{len(self.calls)} calls"
        tokens = f", tokens {self.token_positions}" if self.token_positions is not None else ""
        where = f", in {str(self._folder)!r}" if self._folder is not None else ""
        return (
            f"AttentionStore({len(self.sites)} sites, {calls}, {len(self.samples)} samples, "
            f"grids {grids}{tokens}, {self.nbytes / 1e6:.3g} MB{where})"
        )

    # ------------------------------------------------------------------ files
    def _header(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "sites": [asdict(s) for s in self.sites],
            "calls": [asdict(c) for c in self.calls],
            "samples": [asdict(s) for s in self.samples],
            "layouts": [lay.to_dict() for lay in self._layouts],
            "flat_sites": sorted(self.flat_sites),
            "token_positions": self.token_positions,
            "meta": self.meta,
        }

    def save(self, path) -> Path:
        """Write the store to one safetensors file (maps) with a JSON header (coordinates, metadata).

        The file is written to a temporary name and renamed, so a crash never leaves a half-written store.
        No pickle is involved. Returns the path.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.is_dir():
            raise StoreError(f"{str(path)!r} is a folder; give a file name such as {str(path / 'store.safetensors')!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: self[name].contiguous() for name in self.site_names}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(self._header())})
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    @classmethod
    def load(cls, path) -> "AttentionStore":
        """Read a store: a file written by ``save`` (maps loaded into memory), or a folder written by
        ``probe(stream_to=...)`` (maps stay on disk and are read on access; see ``maps``).

        Raises:
            StoreError: no such file or folder, or it is corrupt, truncated or not an attnprobe store.
        """
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            return cls._open_folder(path)
        if not path.is_file():
            raise StoreError(f"no store file or folder at {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header_text = (f.metadata() or {}).get(_META_KEY)
                if header_text is None:
                    raise StoreError(f"{str(path)!r} is a safetensors file but not an attnprobe store (no header)")
                header = json.loads(header_text)
                maps = {k: f.get_tensor(k) for k in f.keys()}
        except StoreError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt/truncated files
            raise StoreError(f"{str(path)!r} is not a readable attnprobe store (corrupt or truncated?): {exc}") from exc
        store = cls._from_header(path, header, maps)
        n_calls = 1 if store.aggregate else len(store.calls)
        missing = [s.name for s in store.sites if s.name not in maps]
        if missing:
            raise StoreError(f"{str(path)!r} lacks the maps of sites {missing[:5]} (truncated or edited?)")
        for name, t in maps.items():
            if not store.calls and t.numel() == 0:
                continue  # a probe whose block raised before any denoiser call
            if t.ndim != 6 or t.shape[0] != n_calls or t.shape[1] != len(store.samples):
                raise StoreError(
                    f"{str(path)!r}: site {name} has shape {tuple(t.shape)}, expected "
                    f"[{n_calls} calls, {len(store.samples)} samples, head, qh, qw, token]"
                )
        return store

    @classmethod
    def _from_header(cls, path: Path, header, maps: dict, folder: Path | None = None) -> "AttentionStore":
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            found = header.get("format") if isinstance(header, dict) else type(header).__name__
            raise StoreError(f"{str(path)!r} has store format {found!r}; this attnprobe reads {FORMAT_VERSION}")
        try:
            sites = [Site(**s) for s in header["sites"]]
            calls = [Call(**{**c, "layout": tuple(c["layout"])}) for c in header["calls"]]
            samples = [Sample(**s) for s in header["samples"]]
            layouts = [TokenLayout.from_dict(d) for d in header["layouts"]]
            meta, flat = dict(header["meta"]), list(header.get("flat_sites", ()))
            positions = header.get("token_positions")
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise StoreError(f"{str(path)!r} has a malformed header ({type(exc).__name__}: {exc}); edited by hand?") from None
        if len(layouts) != len(samples):
            raise StoreError(f"{str(path)!r} has {len(layouts)} token layouts for {len(samples)} samples")
        return cls(sites, calls, samples, layouts, maps, meta, flat, positions, folder)

    @classmethod
    def _open_folder(cls, folder: Path) -> "AttentionStore":
        header_path = folder / shards.HEADER
        try:
            header = json.loads(header_path.read_text())
        except FileNotFoundError:
            raise StoreError(
                f"{str(folder)!r} is a folder without {shards.HEADER}: not a streamed attnprobe store "
                "(a file written by store.save() is opened by its file name)"
            ) from None
        except ValueError as exc:
            raise StoreError(f"{str(header_path)!r} is not valid JSON (edited by hand?): {exc}") from None
        store = cls._from_header(folder, header, {}, folder)
        listed = store.calls  # the header's: every call at the end of a complete run
        store.calls, store._shards = [], []
        first: dict | None = None
        for path in shards.shard_paths(folder):  # the calls that finished, also after a crash
            call, shapes, _ = shards.read_shard_call(path)
            missing = [s.name for s in store.sites if s.name not in shapes]
            if missing:
                raise StoreError(f"{str(path)!r} lacks the maps of sites {missing[:5]} (edited by hand?)")
            first = first or shapes
            bad = [n for n in shapes if shapes[n] != first.get(n) or shapes[n][0] != len(store.samples)]
            if bad:
                raise StoreError(
                    f"{str(path)!r}: site {bad[0]} has shape {list(shapes[bad[0]])}, other shards "
                    f"{list(first.get(bad[0], ()))} and the header {len(store.samples)} samples (a shard of another store?)"
                )
            store.calls.append(Call(**{**call, "layout": tuple(call["layout"])}))
            store._shards.append(path)
        if store.aggregate and len(store._shards) == 1:
            store.calls = listed
        elif store.meta.get("complete") and store.calls != listed:
            raise StoreError(
                f"{str(folder)!r}: its header lists {len(listed)} calls {[c.index for c in listed][:12]} but calls/ "
                f"holds {len(store.calls)} {[c.index for c in store.calls][:12]} (a shard deleted, copied or added)"
            )
        else:
            order = [(c.generation, c.index) for c in store.calls]
            if order != sorted(set(order)):
                raise StoreError(f"{str(folder)!r}: calls/ holds calls out of order or twice: {order[:12]}")
        return store
