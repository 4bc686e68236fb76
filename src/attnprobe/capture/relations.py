"""Attention relations beyond image → text, recorded beside a probe's maps (``probe(relations=...)``).

The probe's own map is **image → text** (image queries, text keys). A relation is another block of the same
attention, computed exactly from q and k as the model uses them, in fp32, beside the installed processors (the
outputs stay bit-identical):

| relation | where it is read | axes of one call | a row sums to |
|---|---|---|---|
| ``"image->image"`` | at a cross-attention site (UNet, PixArt): its transformer block's self-attention (``attn1``); at a joint or single-stream site (SD3, Flux, Qwen-Image, Flux.2, CogView4): the site itself | ``[sample, head, point, kh, kw]`` | 1 (self-attention); for ``joint="exact"`` the query's image share |
| ``"text->image"`` | joint and single-stream sites | ``[sample, head, token, kh, kw]`` | the text query's image share (``"exact"``), 1 (``"renorm"``) |
| ``"text->text"`` | joint and single-stream sites | ``[sample, head, token, key]`` | the text query's text share (``"exact"``), 1 (``"renorm"``) |

``point`` holds the image positions given as ``probe(points=[(y, x), …])``, fractions of the image's height and width
in [0, 1], each resolved per site to the cell of that site's grid that holds it (``store.meta["relations"]`` lists the
cells): so ``[positions × positions]`` is never made, only ``[points × positions]``. ``token`` holds the probe's
kept text positions (``tokens=``; all by default), ``key`` every text key. ``kh, kw``: the site's image grid.
``joint="exact"`` gives the block of the full softmax over all the site's keys (image and text), ``"renorm"`` the
softmax over that block's keys alone, as for the probe's own maps (``attnprobe.joint``). Heads are averaged with
``heads="mean"``; the maps are kept in the probe's ``dtype`` on its ``device``.

Read at the families whose blocks are checked against a float64 reference (``FAMILIES``): through forward hooks
(UNet, PixArt, SD3, Flux: ``Relations.at_joint`` and ``SelfProbeProcessor``) or at the attention kernel (Qwen-Image,
Flux.2, CogView4: ``Relations.at_kernel``, from the q and k handed to ``scaled_dot_product_attention``); every other
denoiser is refused when the probe opens, naming what is supported.
"""

from __future__ import annotations

from numbers import Real

import torch

from ..errors import ProbeError, warn
from .cross import ProbeProcessor, attention_logits, chain as _chain, output_error, with_tolerance
from .denoiser_call import query_grid
from .joint import CHUNK_ELEMENTS, mask_bias
from .kernel import sequence_bias
from .kinds import _wrapper_class, is_attention, restore_processor, set_processor
from ..store.records import RELATIONS
from .processor import batch_rows

__all__ = ["RELATIONS", "FAMILIES", "check_relations", "relation_modules", "block_probs", "Relations",
           "SelfProbeProcessor"]

#: the families whose relations are read and tested (named in every refusal)
FAMILIES = {"unet": "SD 1.x/2.x, SDXL and other UNet pipelines", "pixart": "PixArt-α/Σ", "sd3": "SD3/SD3.5",
            "flux": "Flux.1", "qwen": "Qwen-Image", "flux2": "Flux.2", "cogview4": "CogView4"}
_TEXT = ("text->image", "text->text")


def _supported() -> str:
    return ", ".join(FAMILIES.values())


def check_relations(relations, points) -> tuple[tuple[str, ...], tuple[tuple[float, float], ...]]:
    """``probe(relations=..., points=...)`` checked: ``(relations, points)`` as tuples (empty: none).

    Args:
        relations: ``None``, one of ``RELATIONS`` or a list of them.
        points: ``(y, x)`` or a list of them, fractions of the image's height and width in [0, 1]; needed for
            ``"image->image"`` and only for it.

    Raises:
        ProbeError: another relation (``"image->text"`` is the probe's own map), points without ``"image->image"``
            or ``"image->image"`` without points, a point that is not two numbers in [0, 1].
    """
    if relations is None:
        if points is not None:
            raise ProbeError(f"points={points!r} selects the image queries of relations='image->image'; pass that too")
        return (), ()
    given = [relations] if isinstance(relations, str) else relations
    if not isinstance(given, (list, tuple)) or not given:
        raise ProbeError(f"relations={relations!r} is not a relation or a list of them: give any of {RELATIONS}")
    for r in given:
        if r == "image->text":
            raise ProbeError("relations='image->text' is the probe's own map (store[site]); relations= adds any of "
                             f"{RELATIONS}")
        if r not in RELATIONS:
            raise ProbeError(f"relations: {r!r} is not one of {RELATIONS}")
    chosen = tuple(dict.fromkeys(given))
    if "image->image" not in chosen:
        if points is not None:
            raise ProbeError(f"points={points!r} selects the image queries of 'image->image', which relations="
                             f"{list(chosen)} does not ask for")
        return chosen, ()
    if points is None:
        raise ProbeError("relations='image->image' needs points=[(y, x), …]: the image positions whose attention to "
                         "every image position is kept, as fractions of the height and width (0.5, 0.5 is the middle)")
    if hasattr(points, "tolist") and not isinstance(points, (list, tuple)):  # a numpy array or a tensor
        points = points.tolist()
    if _is_point(points):
        points = [points]
    if not isinstance(points, (list, tuple)) or not points or not all(_is_point(p) for p in points):
        raise ProbeError(f"points={points!r} is not a list of (y, x) pairs of numbers in [0, 1] (fractions of the "
                         "image's height and width)")
    return chosen, tuple((float(y) + 0.0, float(x) + 0.0) for y, x in points)  # + 0.0: no -0.0 in the metadata


def _is_point(p) -> bool:
    return (isinstance(p, (list, tuple)) and len(p) == 2
            and all(isinstance(v, Real) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in p))


def relation_modules(denoiser, family, sites, relations) -> dict[str, dict[str, object]]:
    """``relation -> {module name: the probed Site it belongs to}``: where each relation is read.

    Raises:
        ProbeError: a denoiser outside ``FAMILIES`` (or a video one); a cross site without an ``attn1``
            self-attention beside it; a text relation with no joint or single-stream site among ``sites``.
    """
    if not relations:
        return {}
    if family.name not in FAMILIES or family.video is not None:
        raise ProbeError(f"relations= are read at {_supported()}; {type(denoiser).__name__} (family {family.name}) is "
                         "not one of them. The probe's own image->text maps need no relations=")
    found: dict[str, dict[str, object]] = {}
    for relation in relations:
        modules = {}
        for site in sites:
            if site.kind == "cross" and relation in _TEXT:
                continue  # the text of a cross-attention site is keys only
            name = _self_attention(denoiser, site) if site.kind == "cross" else site.name
            modules[name] = site
        if not modules:
            raise ProbeError(f"relations={relation!r}: text queries exist only at joint-attention sites (SD3, Flux, "
                             "Qwen-Image, Flux.2, CogView4), "
                             f"and the probed sites of {type(denoiser).__name__} are cross-attention (keys only)")
        found[relation] = modules
    return found


def _self_attention(denoiser, site) -> str:
    """The self-attention module of a cross site's transformer block (``….attn2`` → ``….attn1``)."""
    block, _, leaf = site.name.rpartition(".")
    name = f"{block}.attn1"
    try:
        module = denoiser.get_submodule(name) if leaf == "attn2" else None
    except AttributeError:
        module = None
    if module is None or not is_attention(module) or getattr(module, "is_cross_attention", False):
        raise ProbeError(f"relations='image->image' at site {site.name}: its block has no image self-attention attn1 "
                         "to read (only blocks with attn1 beside attn2 are read)")
    return name


def block_probs(query, image_keys, text_keys, mode: str, blocks, bias=None, heads: str = "keep",
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Blocks of one attention over ``[image; text]`` keys for some queries, in fp32 chunk by chunk.

    Args:
        query: ``[sample, head, query, d]``, already scaled. image_keys, text_keys: ``[sample, head, N | T, d]``
            (``text_keys`` of length 0: a self-attention with no text keys).
        mode: ``"exact"`` (each block of the softmax over all ``N + T`` keys) or ``"renorm"`` (the softmax over the
            block's keys alone). blocks: any of ``"image"``, ``"text"``.
        bias: ``(image_bias, text_bias)`` added to the logits (``joint.mask_bias``), rows ``[… query | 1 …]``.
        heads: ``"mean"`` averages heads (axis kept, length 1). dtype: of the result.

    Returns:
        ``block -> [sample, head or 1, query, N | T]``.
    """
    image_t, text_t = image_keys.float().transpose(-1, -2), text_keys.float().transpose(-1, -2)
    s, h, n, _ = query.shape
    step = max(1, CHUNK_ELEMENTS // max(1, s * h * (image_t.shape[-1] + text_t.shape[-1])))
    parts: dict[str, list] = {b: [] for b in blocks}
    for start in range(0, n, step):
        q = query[:, :, start:start + step].float()
        logits = {"image": q @ image_t, "text": q @ text_t}
        for i, name in enumerate(("image", "text")):
            b = None if bias is None else bias[i]
            if b is not None:
                logits[name] = logits[name] + (b[:, :, start:start + step] if b.shape[2] > 1 else b)
        if mode == "exact":
            lse = torch.logaddexp(logits["image"].logsumexp(-1), logits["text"].logsumexp(-1)).unsqueeze(-1)
        for name in blocks:
            p = logits[name].softmax(-1) if mode == "renorm" else (logits[name] - lse).exp()
            parts[name].append((p.mean(1, keepdim=True) if heads == "mean" else p).to(dtype))
    return {name: torch.cat(chunks, dim=2) for name, chunks in parts.items()}


class SelfProbeProcessor(ProbeProcessor):
    """Wraps a self-attention module (``attn1``) for ``"image->image"``: the installed processor computes the output
    unchanged; the wrapper reads q and k (``to_q``, ``to_k``, then ``norm_q``/``norm_k`` and ``attn.scale`` as the
    processor applies them) and keeps ``softmax(q·kᵀ·scale)`` of the selected query positions; once per probe it
    compares the output at those positions with these probabilities times the values (``cross.output_error``)."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        state = self.state
        if self.removed or not state.keep:
            return self.inner(attn, hidden_states, *args, **kwargs)
        self._query = self._key = None
        check = None if self.checked or torch.compiler.is_compiling() else self._check_hooks(attn)
        output = self._run(attn, hidden_states, args, kwargs, check)
        query, key = self._query, self._key
        self._query = self._key = None
        if query is None or key is None:
            raise ProbeError(f"site {self.site}: the installed processor {type(self.inner).__name__} did not call "
                             "attn.to_q and attn.to_k, so attnprobe cannot read its self-attention")
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is not None or key.shape[1] != query.shape[1]:
            raise ProbeError(f"site {self.site}: the self-attention got {'an attention mask' if mask is not None else 'keys other than its own image positions'}"
                             f" ({key.shape[1]} keys, {query.shape[1]} queries): relations='image->image' reads plain "
                             "self-attention only")
        relate = state.relate
        cells, grid = relate.cells(self.site, query.shape[1])
        with torch.no_grad():
            chosen = query.index_select(1, cells.to(query.device))
            probs = attention_logits(attn, chosen, key, None, state.rows).softmax(-1)  # [sample, head, point, N]
            kept = (probs.mean(1, keepdim=True) if state.heads == "mean" else probs).to(state.dtype)
        relate.outbox.append(("image->image", self.site, kept.unflatten(-1, grid)))
        if check:
            self._check_points(attn, probs, check[1], cells)
        return output

    def _check_points(self, attn, probs, seen: dict, cells) -> None:
        self.checked = True
        name = type(self.innermost()).__name__
        if "value" not in seen or "out" not in seen:
            self.state.checks.append((self.site, name, None, None, None))
            return
        rows = self.state.rows
        with torch.no_grad():
            out = batch_rows(seen["out"], rows).index_select(1, cells.to(seen["out"].device))
            error = output_error(attn, probs, batch_rows(seen["value"], rows), out)
        self.state.checks.append((self.site, name, *with_tolerance(error, out.dtype), None))


class Relations:
    """The relations of one probe: where they are read, the maps of the call in progress (``outbox``, filled by the
    wrappers) and of every kept call.

    Args:
        relations, points: as ``check_relations`` returns them. modules: ``relation_modules``'s.
        budget: ``bytes of one call -> None``, called after the first kept call of each pipeline call; it raises
            ``ProbeError`` when the pipeline call's relations would not fit (``frames.check_budget``).
    """

    def __init__(self, relations, points, modules, budget=None) -> None:
        self.relations, self.points, self.modules, self.budget = relations, points, modules, budget
        self.first = True  # the next kept call is a pipeline call's first
        self.self_sites = sorted({m for r, ms in modules.items() for m, s in ms.items() if s.kind == "cross"})
        self.joint: dict[str, set] = {}
        for relation, ms in modules.items():
            for m, s in ms.items():
                if s.kind != "cross":
                    self.joint.setdefault(m, set()).add(relation)
        self.outbox: list = []
        self.text_queries: dict[str, torch.Tensor] = {}
        self.latent_hw = (0, 0)
        self.grids: dict = {}
        self.calls: list[tuple[int, dict]] = []  # (denoiser call index, {(relation, module): map}) per kept call
        self.wrappers: dict[str, ProbeProcessor] = {}
        self.originals: dict[str, object] = {}
        self.hooks = []

    def install(self, denoiser, state) -> None:
        """Wrap each ``attn1`` read for ``image->image``; hook the text-query projection of each joint site read for a
        text relation (``add_q_proj`` or the fused ``to_added_qkv``)."""
        for name in self.self_sites:
            attn = denoiser.get_submodule(name)
            self.originals[name] = attn.processor
            self.wrappers[name] = _wrapper_class(attn.processor, SelfProbeProcessor)(attn.processor, name, attn, state)
            set_processor(attn, self.wrappers[name])
        for name, relations in self.joint.items():
            attn = denoiser.get_submodule(name)
            if not relations & set(_TEXT) or getattr(attn, "add_k_proj", None) is None and getattr(
                    attn, "to_added_qkv", None) is None:
                continue  # a single-stream site's text queries are in its own [text; image] queries
            fused = bool(getattr(attn, "fused_projections", False)) and getattr(attn, "to_added_qkv", None) is not None
            module = attn.to_added_qkv if fused else attn.add_q_proj
            self.hooks.append(module.register_forward_hook(self._text_query_hook(name, state, fused)))

    def _text_query_hook(self, name: str, state, fused: bool):
        def keep(module, args, output) -> None:
            if state.keep:
                self.text_queries[name] = output.chunk(3, dim=-1)[0] if fused else output
        return keep

    def remove(self, denoiser) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for name, wrapper in self.wrappers.items():
            restore_processor(denoiser.get_submodule(name), wrapper, self.originals[name])
        self.wrappers.clear()

    def replaced(self, denoiser) -> dict:
        """``{name: module}`` of the wrapped self-attention modules whose processor was replaced while the probe was
        open."""
        modules = {n: denoiser.get_submodule(n) for n in self.wrappers}
        return {n: m for n, m in modules.items() if not any(p is self.wrappers[n] for p in _chain(m.processor))}

    def cells(self, module: str, n: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """The query positions of ``points`` at a module with ``n`` image positions, and its ``(qh, qw)`` grid."""
        key = (module, n, self.latent_hw)
        if key not in self.grids:
            grid = query_grid(n, self.latent_hw)
            if grid is None:
                raise ProbeError(f"site {module}: its {n} image positions do not factor into the {self.latent_hw} latent "
                                 "grid, so points=(y, x) cannot be placed on it")
            h, w = grid
            cells = [min(int(y * h), h - 1) * w + min(int(x * w), w - 1) for y, x in self.points]
            self.grids[key] = (torch.tensor(cells, dtype=torch.long), grid)
        return self.grids[key]

    def at_joint(self, wrapper, attn, query, key, text_key, emb, mask) -> None:
        """The relations of a joint or single-stream site's call (``joint.JointProbeProcessor`` calls it with what it
        read), into ``outbox``."""
        state, site = wrapper.state, wrapper.site
        wanted = self.joint.get(site, ())
        if not wanted:
            return
        text_query = None
        if wanted & set(_TEXT):
            text_query = self.text_queries.pop(site, None) if wrapper.kind == "joint" else True
            if text_query is None:
                raise ProbeError(f"site {site}: the processor {type(wrapper.inner).__name__} did not call attn.add_q_proj, "
                                 "so the text queries of relations= cannot be read")
            if mask is not None:
                raise ProbeError(f"site {site}: text queries at a site with an attention mask (Chroma) are not read; "
                                 "relations='image->image' is")
        with torch.no_grad():
            q_img, k_img, k_txt, q_txt = wrapper._split(attn, query, key, text_key, emb, state, text_query=text_query)
            if k_img.shape[2] != q_img.shape[2]:
                raise ProbeError(f"site {site}: {k_img.shape[2] - q_img.shape[2]} image keys are not image positions "
                                 "(FluxKontextPipeline's input image): relations= are read where every image key is "
                                 "a generated position")
            bias = None if mask is None else mask_bias(mask, state.rows, k_txt.shape[2])
            grid = None
            if "image->image" in wanted:
                cells, grid = self.cells(site, q_img.shape[2])
                cells = cells.to(q_img.device)
                rows = None if bias is None else tuple(b.index_select(2, cells) if b.shape[2] > 1 else b for b in bias)
                probs = block_probs(q_img.index_select(2, cells), k_img, k_txt, state.joint, ("image",), rows,
                                    state.heads, state.dtype)["image"]
                self.outbox.append(("image->image", site, probs.unflatten(-1, grid)))
            if q_txt is None:
                return
            if state.tokens is not None:
                q_txt = q_txt.index_select(2, state.tokens.to(q_txt.device))
            blocks = {"text->image": "image", "text->text": "text"}
            found = block_probs(q_txt, k_img, k_txt, state.joint, [blocks[r] for r in _TEXT if r in wanted],
                                None, state.heads, state.dtype)
            for relation in _TEXT:
                if relation in wanted:
                    probs = found[blocks[relation]]
                    if relation == "text->image":
                        probs = probs.unflatten(-1, grid or self.cells(site, q_img.shape[2])[1])
                    self.outbox.append((relation, site, probs))

    def at_kernel(self, wrapper, query, key, mask, scale, positions) -> None:
        """The relations of a site read at its attention kernel (``kernel.KernelProbeProcessor``: a family whose q and
        k are read at ``scaled_dot_product_attention``), from the kernel's ``query`` and ``key`` ``[batch, head, seq,
        d]``, its mask and scale, and ``positions``: the image queries, the other keys and the text keys of the
        sequence (slices)."""
        state, site = wrapper.state, wrapper.site
        wanted = self.joint.get(site, ())
        if not wanted:
            return
        image_q, image_k, text = positions
        if not isinstance(image_k, slice) or image_k != image_q:
            raise ProbeError(f"site {site}: keys other than its image and text positions share its softmax (register "
                             "or padding tokens): relations= are read where the keys are the image and the text")
        rows = state.rows
        with torch.no_grad():
            q, k = batch_rows(query, rows), batch_rows(key, rows)
            k_img, k_txt = k[:, :, image_k], k[:, :, text]
            if "image->image" in wanted:
                cells, grid = self.cells(site, image_q.stop - image_q.start)
                at = cells.to(q.device)
                bias = None if mask is None else tuple(
                    b.index_select(2, at) if b.shape[2] > 1 else b
                    for b in (sequence_bias(mask, rows, image_q, image_k), sequence_bias(mask, rows, image_q, text)))
                probs = block_probs(q[:, :, image_q].index_select(2, at).float() * scale, k_img, k_txt, state.joint,
                                    ("image",), bias, state.heads, state.dtype)["image"]
                self.outbox.append(("image->image", site, probs.unflatten(-1, grid)))
            if not wanted & set(_TEXT):
                return
            if query.shape[2] != key.shape[2]:
                raise ProbeError(f"site {site}: its queries are image positions only, so relations= has no text "
                                 "queries to read there")
            kept = slice(None) if state.tokens is None else state.tokens.to(q.device)
            bias = None if mask is None else tuple(
                b if b.shape[2] == 1 else b[:, :, kept] for b in (sequence_bias(mask, rows, text, image_k),
                                                                  sequence_bias(mask, rows, text, text)))
            found = block_probs(q[:, :, text][:, :, kept].float() * scale, k_img, k_txt, state.joint,
                                ("image", "text"), bias, state.heads, state.dtype)
            grid = self.cells(site, image_q.stop - image_q.start)[1]
            for relation, block in (("text->image", "image"), ("text->text", "text")):
                if relation in wanted:
                    probs = found[block]
                    self.outbox.append((relation, site, probs.unflatten(-1, grid) if block == "image" else probs))

    def collect(self, call: int | None, fill, device) -> None:
        """The call in progress is over: its maps are kept under ``call`` (``None``: not kept, dropped), each
        ``[row …]`` made ``[sample …]`` by ``fill`` and moved to ``device``."""
        outbox, self.outbox = self.outbox, []
        self.text_queries.clear()
        if call is None:
            return
        maps = {}
        for relation, module, m in outbox:
            if (relation, module) in maps:
                raise ProbeError(f"site {module} ran twice in denoiser call {call}; attnprobe expects one run per call")
            maps[(relation, module)] = fill(m).to(device)
        self.calls.append((call, maps))
        if self.first and self.budget is not None:
            self.first = False
            self.budget(sum(m.nbytes for m in maps.values()))

    def missing(self, call: int) -> list[str]:
        """The modules that left no map in the kept ``call`` (bypassed or replaced)."""
        got = next((maps for c, maps in self.calls if c == call), {})
        return [f"{m} ({r})" for r, ms in self.modules.items() for m in ms if (r, m) not in got]

    def finish(self, kept: list[int]) -> tuple[dict, dict]:
        """``(maps, meta)``: ``relation -> module -> [call, …]`` over the ``kept`` calls (in that order), and
        ``store.meta["relations"]``: the relations, points, and per module its site and grid and the points' cells."""
        by_call = dict(self.calls)
        self.calls.clear()
        maps: dict[str, dict[str, torch.Tensor]] = {}
        for relation, modules in self.modules.items():
            for module in modules:
                per_call = [by_call[c][(relation, module)] for c in kept if (relation, module) in by_call.get(c, {})]
                if per_call and len(per_call) == len(kept):
                    maps.setdefault(relation, {})[module] = torch.stack(per_call)
                elif kept:  # every kept call was checked for its relations; said, not raised: the maps stay
                    warn(f"relation {relation} of {module} holds {len(per_call)} of the store's {len(kept)} calls: "
                         "not kept (a relation is kept only with every call)")
        meta = {"relations": list(self.relations), "points": [list(p) for p in self.points], "modules": {},
                "read": {relation: sorted(modules) for relation, modules in maps.items()}}
        for (module, n, hw), (cells, (h, w)) in self.grids.items():
            meta["modules"][module] = {"grid": [h, w], "cells": [[c // w, c % w] for c in cells.tolist()]}
        for relation, modules in self.modules.items():
            for module, site in modules.items():
                meta["modules"].setdefault(module, {})["site"] = site.name
        return maps, meta

