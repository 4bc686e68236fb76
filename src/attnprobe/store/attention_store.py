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

A video store (a probe of a video denoiser: Wan, CogVideoX) has a frame axis: ``store[site]`` is
``[call, sample, head, qt, qh, qw, token]``, ``qt`` the latent frames at the sites' resolution (the latent frames
over the denoiser's temporal patch); ``store.video`` says how they map to latent and decoded frames, and
``store.grid_dims`` names the grid axes (``("qt", "qh", "qw")``, or ``("qh", "qw")`` for an image store, whose maps
and files are as they always were).

Capture-time reductions change two axes, and say so: with ``probe(tokens=...)`` the ``token`` axis holds only
the kept positions (``store.token_positions``; their values are their share of the full softmax, so they no
longer sum to 1); with ``probe(aggregate="mean")`` the ``call`` axis has length 1 and holds the mean over
``store.calls`` (``store.aggregate``). A store streamed to a folder (``probe(stream_to=...)``) reads its maps
from disk on each access (``store.maps`` reads only what it is asked for).

A probe opened with ``relations=`` keeps other blocks of the same attention beside the maps (``store.relation``):
``image->image`` at chosen points, and ``text->image``, ``text->text`` at joint-attention sites
(``attnprobe.capture.relations``).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ArgumentTypeError, ConceptError, SelectionError, StoreError, UnknownSiteError
from ..text.tokens import TokenLayout, find_concept
from .export import to_pandas as export_pandas, to_xarray as export_xarray
from .files import header, json_safe, load as load_file, save as save_file
from .integrity import new_store_id
from .shards import ShardWriter, read_shard_call, read_site
from .axes import as_index, positions
from .records import Call, Sample, Site

__all__ = ["AttentionStore", "StoreWriter", "require_store"]

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


class AttentionStore:
    """Cross-attention maps keyed by site, with call, sample and token coordinates.

    Built by ``attnprobe.probe``; loaded by ``AttentionStore.load``. Attributes: ``sites`` (``list[Site]``,
    execution order), ``calls`` (``list[Call]``), ``samples`` (``list[Sample]``), ``meta`` (dict: pipeline and
    denoiser class, versions, scheduler, timesteps, prompts, image size, capture options), ``flat_sites``.
    """

    def __init__(self, sites, calls, samples, layouts, maps, meta, flat_sites=(), token_positions=None, folder=None,
                 shards=(), store_id=None, relations=None):
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
        self._shards: list[Path] = list(shards)  # a streamed store's finished shards, one per entry of self.calls
        #: a random id (32 hex digits), written in the store's files: a streamed folder's shards must all carry it
        self.store_id: str = store_id if isinstance(store_id, str) else new_store_id()
        #: ``relation -> module -> map`` of ``probe(relations=...)`` (see ``relation``); empty without
        self.relations: dict[str, dict[str, torch.Tensor]] = {r: dict(m) for r, m in (relations or {}).items()}

    @property
    def aggregate(self) -> str | None:
        """``"sum"`` or ``"mean"`` when the call axis holds one aggregate over ``calls`` (``probe(aggregate=)``)."""
        return (self.meta.get("capture") or {}).get("aggregate")

    @property
    def video(self) -> dict | None:
        """A video store's frame record (``meta["video"]``), ``None`` for an image store. Keys: ``qt`` (length of the
        ``qt`` axis), ``latent_frames`` (the denoiser's latent frames), ``patch`` (``[pt, ph, pw]``: latent frames,
        rows and columns per query), ``temporal_compression`` (decoded frames per latent frame after the first, the
        VAE's; ``None`` when the pipeline does not say) and ``frames`` (decoded frames, ``None`` when unknown)."""
        video = self.meta.get("video")
        return dict(video) if isinstance(video, dict) else None

    @property
    def grid_dims(self) -> tuple[str, ...]:
        """The names of the query-grid axes of every site's maps: ``("qt", "qh", "qw")`` for a video store, else
        ``("qh", "qw")`` (the axes between ``head`` and ``token``)."""
        return ("qt", "qh", "qw") if self.video else ("qh", "qw")

    @property
    def folder(self) -> Path | None:
        """The folder a streamed store lives in (``probe(stream_to=...)``), else ``None``."""
        return self._folder

    # ------------------------------------------------------------------ access
    @property
    def site_names(self) -> list[str]:
        """Names of the captured sites, in execution order."""
        return [s.name for s in self.sites]

    def site_name(self, site) -> str:
        """The name of a site given as a ``Site`` or a name.

        Raises:
            UnknownSiteError (a KeyError): not a site of this store (the message lists its sites).
        """
        name = site.name if isinstance(site, Site) else site
        if name not in self._chunks and name not in self._maps:
            shown = "\n  ".join(self.site_names[:40])
            raise UnknownSiteError(f"site {name!r} is not in this store; its {len(self.sites)} sites are:\n  {shown}")
        return name

    def __getitem__(self, site) -> torch.Tensor:
        """``[call, sample, head, qh, qw, token]`` probabilities of one site (``Site`` or its name); a video store's
        are ``[call, sample, head, qt, qh, qw, token]``.

        Raises:
            UnknownSiteError (a KeyError): the site is not in the store (the message lists the sites).
        """
        name = self.site_name(site)
        if self._folder is not None:
            return read_site(self._shards, name)
        chunks = self._chunks.get(name)
        if chunks:
            prior = [self._maps[name]] if name in self._maps else []
            self._maps[name] = torch.cat(prior + [torch.stack(chunks)], dim=0)
            chunks.clear()
        if name not in self._maps:
            return torch.empty(0)
        return self._maps[name]

    def maps(self, site, calls=None, samples=None, tokens=None) -> torch.Tensor:
        """A slice of one site's maps: ``[call, sample, head, qh, qw, token]`` (video: ``qt qh qw``) for the chosen
        entries.

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
        name = self.site_name(site)
        out = self[name] if self._folder is None else None
        n_calls = len(self._shards) if out is None else (out.shape[0] if out.numel() else 0)
        calls = positions("call", calls, n_calls)
        samples = positions("sample", samples, len(self.samples))
        tokens = positions("token", tokens, self.n_tokens)
        if out is None:
            paths = self._shards if calls is None else [self._shards[i] for i in calls]
            return read_site(paths, name, samples, tokens)
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

    @property
    def nbytes(self) -> int:
        """Bytes of the maps (kept values × dtype size); for a streamed store, the bytes of its shards' maps."""
        if self._folder is not None:
            total = 0
            for path in self._shards:
                _, shapes, dtypes = read_shard_call(path)
                total += sum(math.prod(shape) * _DTYPE_BYTES.get(dtypes[n], 4) for n, shape in shapes.items())
            return total
        total = sum(t.numel() * t.element_size() for t in self._maps.values())
        total += sum(t.numel() * t.element_size() for ch in self._chunks.values() for t in ch)
        return total

    def sample_index(self, sample) -> int:
        """A sample's position on the ``sample`` axis, from a ``Sample`` or an int (negative: from the end).

        Raises:
            SelectionError (an IndexError): no such sample (the message lists the samples).
        """
        idx = sample.index if isinstance(sample, Sample) else as_index(sample)
        if not self.samples:
            raise SelectionError(
                f"sample {sample!r}: this store holds no samples, because no denoiser call was recorded (the block "
                f"ended before the first one: store.meta.get('complete') is {self.meta.get('complete')!r})")
        if idx is None or not -len(self.samples) <= idx < len(self.samples):
            listing = "\n  ".join(
                f"{s.index}: {s.pass_label} prompt {s.prompt_index} image {s.image_index}: {s.text!r}" for s in self.samples
            )
            raise SelectionError(f"sample {sample!r} is not in this store; its {len(self.samples)} samples are:\n  {listing}")
        return idx % len(self.samples)  # -1: the last sample

    def layout(self, sample) -> TokenLayout:
        """The token layout of a sample (strings, kinds, ids, text, offsets)."""
        return self._layouts[self.sample_index(sample)]

    def _kept(self, values: list) -> list:
        return list(values) if self.token_positions is None else [values[p] for p in self.token_positions]

    def tokens(self, sample) -> list[str]:
        """The string of every position on the ``token`` axis for a sample: ``<|startoftext|>``, words,
        ``<|endoftext|>``, padding (only the kept positions after ``probe(tokens=...)``).

        Positions whose text is unknown (``prompt_embeds`` passed) are ``""``. Length = the ``token`` axis.
        """
        return self._kept(self.layout(sample).strings)

    def token_kinds(self, sample) -> list[str]:
        """Per position on the ``token`` axis ``"start"``, ``"word"``, ``"end"``, ``"pad"``, ``"template"`` (a position of
        the text an LLM encoder's pipeline wrapped the prompt in: instruction, chat turns) or ``"unknown"``."""
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
        idx = self.sample_index(sample)
        s = self.samples[idx]
        where = f"sample {idx} ({s.pass_label} pass, prompt {s.prompt_index})"
        try:
            found = find_concept(self._layouts[idx], concept, where=where)
        except ConceptError as exc:
            cond = [x.index for x in self.samples if x.pass_label == "cond"]
            if s.pass_label == "cond" or not cond:
                raise
            # a concept is usually looked up in the prompt: say where the prompt's rows are
            raise ConceptError(f"{exc} Sample {idx} is a row of the {s.pass_label} pass (its text is not the prompt); "
                               f"the conditional samples are {cond}: pass sample={cond[0]}") from None
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
        name = self.site_name(site)
        shares = (self.meta.get("text_share") or {}).get(name)
        if shares is None:
            kind = next((s.kind for s in self.sites if s.name == name), "?")
            mode = (self.meta.get("capture") or {}).get("joint")
            raise StoreError(
                f"site {name} ({kind}) has no text share: only joint-attention sites (SD3, Flux) captured with "
                f"joint='exact' record one (this store: joint={mode!r})"
            )
        return torch.tensor(shares, dtype=torch.float32)

    def relation(self, relation: str, site) -> torch.Tensor:
        """One relation of one site, recorded with ``probe(relations=...)`` (``attnprobe.capture.relations``).

        Args:
            relation: ``"image->image"``, ``"text->image"`` or ``"text->text"``.
            site: a probed site (name or ``Site``), or the module the relation was read at (a UNet's ``…attn1``
                beside the probed ``…attn2``).

        Returns:
            ``image->image``: ``[call, sample, head, point, kh, kw]``, the attention of each of
            ``meta["relations"]["points"]`` (at the cells ``meta["relations"]["modules"][module]["cells"]``) over the
            site's image grid; ``text->image``: ``[call, sample, head, token, kh, kw]``; ``text->text``: ``[call,
            sample, head, token, key]``. ``token``: the store's token axis (``token_positions``), ``key``: every text
            key. Each row sums to 1 for self-attention and ``joint="renorm"``, to its block's share of the softmax
            for ``joint="exact"``; NaN for a sample without a row in a call, as in the maps.

        Raises:
            StoreError: the store has no such relation (it names those it has). UnknownSiteError: no such site.
        """
        found = self.relations.get(relation)
        if found is None:
            have = sorted(self.relations) or "none (the probe was opened without relations=)"
            raise StoreError(f"this store holds no {relation!r} relation; it holds {have}")
        name = site.name if isinstance(site, Site) else site
        if name in found:
            return found[name]
        modules = (self.meta.get("relations") or {}).get("modules") or {}
        read = [m for m in found if (modules.get(m) or {}).get("site") == name]
        if len(read) == 1:
            return found[read[0]]
        raise UnknownSiteError(f"{relation!r} holds no site {name!r}; it holds {sorted(found)[:12]}"
                               + (" …" if len(found) > 12 else ""))

    def call_coordinates(self) -> tuple[list, list, list]:
        """Per entry of the ``call`` axis: call index, timestep, generation (one entry ``-1, nan, -1`` for an
        aggregate over calls)."""
        if self.aggregate:
            return [-1], [float("nan")], [-1]
        return [c.index for c in self.calls], [c.timestep for c in self.calls], [c.generation for c in self.calls]

    # ------------------------------------------------------------------ export
    def to_xarray(self, site=None):
        """One site's maps as a labelled ``xarray.DataArray``: see ``attnprobe.store.export.to_xarray``."""
        return export_xarray(self, site)

    def to_pandas(self):
        """A tidy ``pandas.DataFrame`` of token masses: see ``attnprobe.store.export.to_pandas``."""
        return export_pandas(self)

    def __repr__(self) -> str:
        n_grid = len(self.grid_dims)
        grids = sorted({tuple(self[n].shape[3:3 + n_grid]) for n in self.site_names if self[n].numel()})
        calls = f"the {self.aggregate} over {len(self.calls)} calls" if self.aggregate else f"{len(self.calls)} calls"
        tokens = f", tokens {self.token_positions}" if self.token_positions is not None else ""
        where = f", in {str(self._folder)!r}" if self._folder is not None else ""
        related = "".join(f", {r} at {len(m)} sites" for r, m in self.relations.items())
        return (
            f"AttentionStore({len(self.sites)} sites, {calls}, {len(self.samples)} samples, "
            f"grids {grids}{tokens}, {self.nbytes / 1e6:.3g} MB{related}{where})"
        )

    # ------------------------------------------------------------------ files
    def save(self, path) -> Path:
        """Write the store to one safetensors file (maps) with a JSON header (coordinates, metadata) and an
        integrity record (SHA-256 checksums of the header and the maps, see ``attnprobe.store.integrity``).

        The file is written to a temporary name and renamed, so a crash (or a full disk) never leaves a half-written
        store and never harms a file already at ``path``. No pickle is involved. Returns the path.

        Raises:
            StoreError: ``path`` is a folder, or ends with a path separator. StoreIOError (a StoreError and an
                OSError): the file could not be written (full disk, a folder that cannot be made, read-only,
                permission); the message names the path and cause. A missing folder is made.
            ArgumentTypeError: ``path`` is not a str or ``os.PathLike``.
        """
        return save_file(self, path)

    @classmethod
    def load(cls, path, *, verify: bool = True, missing_calls: str = "error") -> "AttentionStore":
        """Read a store: a file written by ``save`` (maps loaded into memory), or a folder written by
        ``probe(stream_to=...)`` (maps stay on disk and are read on access; see ``maps``).

        Before it returns, the header is checked against the maps (sites, shapes, sample indices, token positions)
        and, with ``verify``, every map is read once: its checksum compared with the one written with it, and its
        values checked to be probabilities (finite, in [0, 1] — [0, calls] for ``aggregate="sum"`` — NaN only as a
        whole sample's map of a call). Files of attnprobe 0.2.0 have no checksums and load without them (the other
        checks still run). A streamed folder's shards must carry its store id and consecutive numbers.

        Args:
            path: a ``.safetensors`` file or a streamed store's folder (str or ``os.PathLike``).
            verify: read and check every map (SHA-256 and values: about 0.9 s per GB for a saved file, 1.3 s for a
                streamed folder, on 2 CPU cores; ``benchmarks/integrity.py``). ``False`` checks only headers, shapes,
                store ids and gaps: a streamed store then opens without reading its maps. Default True.
            missing_calls: a streamed store whose shards have a gap (a shard between two others missing, or one
                its finished header lists): ``"error"`` (default) refuses it, naming the missing calls; ``"skip"``
                loads the other calls, warns, and lists the missing shard numbers in ``store.meta["missing_calls"]``.

        Raises:
            StoreError: no such file or folder; a file corrupt, truncated, edited (a checksum differs) or not an
                attnprobe store; a header that contradicts the maps; a shard of another store; a gap in the calls.
            StoreIOError: the file could not be read (permission). ArgumentTypeError: ``path`` is not a path.
            ArgumentError: ``missing_calls`` is not ``"error"`` or ``"skip"``.
        """
        return load_file(cls, path, verify=verify, missing_calls=missing_calls)


class StoreWriter:
    """The only way a store is filled while a probe records (``attnprobe.capture``): the store's samples and
    token layouts, each finished denoiser call's maps (kept in memory, or written to a streamed folder's shard),
    an aggregate over calls, and the closing metadata.

    Args:
        sites: the probed sites (``list[Site]``). meta: the store's metadata so far.
        folder: ``probe(stream_to=...)``'s folder (a new or empty one), or ``None`` to keep the maps in memory.

    Raises:
        StoreError: ``folder`` is a file or a folder that is not empty.
    """

    def __init__(self, sites, meta: dict, folder=None) -> None:
        self.store = AttentionStore(sites, [], [], [], {}, meta, folder=folder)
        self.shards = ShardWriter(folder, self.store.store_id) if folder is not None else None

    def set_samples(self, samples, layouts, token_positions=None) -> None:
        """The captured samples (``list[Sample]``), their token layouts, and the kept token positions (or ``None``)."""
        self.store.samples[:] = samples
        self.store._layouts[:] = layouts
        self.store.token_positions = None if token_positions is None else list(token_positions)

    def add_flat_site(self, site: str) -> None:
        """A site whose queries do not factor into the latent grid: its maps are kept as ``[qh=1, qw=query]``."""
        self.store.flat_sites.add(site)

    def append(self, call: Call, maps: dict) -> None:
        """One finished denoiser call: ``site -> [sample, head, qh, qw, token]`` (video: ``qt qh qw``) on the store's
        device."""
        store = self.store
        if self.shards is not None:
            store._shards.append(self.shards.write(asdict(call), maps))
        else:
            for site, m in maps.items():
                store._chunks[site].append(m)
        store.calls.append(call)

    def set_relations(self, relations: dict) -> None:
        """``relation -> module -> [call, …]`` of ``probe(relations=...)`` (kept in memory; the calls the store keeps)."""
        self.store.relations = relations

    def set_aggregate(self, calls, maps: dict, layout) -> None:
        """The aggregate over ``calls``: ``site -> [sample, head, qh, qw, token]`` (video: ``qt qh qw``), one entry on
        the ``call`` axis."""
        store = self.store
        store.calls[:] = calls
        if self.shards is not None and maps:
            record = {"index": -1, "timestep": float("nan"), "generation": -1, "layout": list(layout)}
            store._shards.append(self.shards.write(record, maps))
        else:
            store._maps.update({site: m.unsqueeze(0) for site, m in maps.items()})

    def write_header(self, meta: dict | None = None) -> None:
        """A streamed store's header as it stands (with ``meta`` in place of the store's), so that the folder is
        readable from its first shard on, also after a crash. Nothing for a store in memory."""
        if self.shards is not None:
            found = header(self.store)
            self.shards.write_header(json_safe(found if meta is None else {**found, "meta": meta}))

    def finish(self, sites) -> None:
        """Close the store: its sites in execution order (``list[Site]``), its header written (streamed) or its
        calls joined into one tensor per site (memory)."""
        store = self.store
        store.sites = list(sites)
        store.meta = json_safe(store.meta)
        if self.shards is not None:
            self.shards.write_header(header(store))
        else:
            for name in store.site_names:
                store[name]  # joins the per-call chunks


def require_store(value, what: str, name: str = "store") -> None:
    """Raise ``ArgumentTypeError`` unless ``value`` is an ``AttentionStore`` (a path or a probe's output folder is
    not one yet: ``AttentionStore.load``). ``what``: the function, for the message; ``name``: its argument."""
    if not isinstance(value, AttentionStore):
        try:
            shown = f" {value!r:.60}"
        except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the message
            shown = ""
        raise ArgumentTypeError(
            f"{what}: {name} is a {type(value).__name__}{shown}, not an AttentionStore: pass the store a probe "
            "returned, or AttentionStore.load(path) to read one from a file or folder"
        )
