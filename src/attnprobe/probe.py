"""``probe()``: record every cross-attention map of a diffusers pipeline while it generates as usual.

    >>> import attnprobe
    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with attnprobe.probe(pipe, heads="mean") as store:
    ...     _ = pipe("a picture of a dog", num_inference_steps=2, height=64, width=64, output_type="latent")
    >>> len(store.calls), tuple(store[store.sites[0].name].shape)
    (2, (2, 1, 1, 8, 8, 77))

How it works: each selected site's installed processor is wrapped (``processors.ProbeProcessor``); a
pre-forward hook on the denoiser counts denoiser calls and reads the timestep and the latent size; a
pre-forward hook on the (first) text encoder records the token ids each pipeline call encodes. Everything is
removed in ``finally``, also when generation raises.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import replace
import inspect
import math
import platform
import warnings
from typing import Iterator, Sequence

import torch
from einops import rearrange

from . import __version__
from .errors import ProbeError
from .processors import ProbeProcessor, attention_probs, wrap_processor
from .sites import SiteSelector, _record_order, denoiser_of, list_sites, select_sites
from .store import AttentionStore, Call, Sample
from .tokens import TokenLayout, decode_ids, token_layout, unlabelled_layout

__all__ = ["probe"]

PASSES = ("cond", "uncond", "all")
HEADS = ("keep", "mean")


def _as_list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


class _Recorder:
    """The state of one probe: installed wrappers and hooks, the call counter, the batch layout."""

    def __init__(self, pipe, denoiser, sites, passes, heads, dtype, device, prompts, all_sites=()):
        self.pipe = pipe if pipe is not denoiser else None
        self.denoiser = denoiser
        self.sites = sites
        self.passes = passes
        self.heads = heads
        self.dtype = dtype
        self.device = torch.device(device)
        self.caller_prompts = _as_list(prompts)
        self.modules = {s.name: denoiser.get_submodule(s.name) for s in sites}
        self.all_sites = [s.name for s in all_sites] or list(self.modules)
        self.order_handles = []
        self.originals: dict[str, object] = {}
        self.wrappers: dict[str, ProbeProcessor] = {}
        self.handles = []
        self.call = -1
        self.generation = -1
        self.calls_in_generation = 0
        self.encoded: list[torch.Tensor] = []
        self.given: dict | None = None
        self.rows: torch.Tensor | None = None
        self.layout: tuple[str, ...] = ()
        self.last_timestep = float("inf")
        self.latent_hw: tuple[int, int] = (0, 0)
        self.seen: list[str] = []
        self.order: list[str] = []
        self.grids: dict[tuple[str, int, int, int], tuple[int, int]] = {}
        self.sample_key = None
        self.prompt_texts: dict[str, list[str] | None] = {}
        self.store = AttentionStore(sites, [], [], [], {}, self._meta())
        self.encoder, self.tokenizer = self._primary_text_encoder()

    # -------------------------------------------------------------- install / remove
    def _primary_text_encoder(self):
        if self.pipe is None:
            return None, None
        for enc_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            enc = getattr(self.pipe, enc_name, None)
            if isinstance(enc, torch.nn.Module):
                return enc, getattr(self.pipe, tok_name, None)
        return None, getattr(self.pipe, "tokenizer", None)

    def install(self) -> None:
        try:
            for name, attn in self.modules.items():
                original = attn.processor
                wrapper = wrap_processor(original, name, self._on_probs, attn)
                self.originals[name] = original
                self.wrappers[name] = wrapper
                attn.set_processor(wrapper)
            self.handles.append(self.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True))
            # execution order of every cross-attention site (not only the probed ones), during the first call
            for name in self.all_sites:
                hook = functools.partial(self._on_site_order, name)
                self.order_handles.append(self.denoiser.get_submodule(name).register_forward_pre_hook(hook))
            self.order_handles.append(self.denoiser.register_forward_hook(self._after_first_call))
            if self.encoder is not None:
                self.handles.append(self.encoder.register_forward_pre_hook(self._on_encode, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def _on_site_order(self, name, module, args) -> None:
        if name not in self.order:
            self.order.append(name)

    def _after_first_call(self, module, args, output) -> None:
        for handle in self.order_handles:
            handle.remove()
        self.order_handles.clear()

    def remove(self) -> None:
        for handle in self.handles + self.order_handles:
            handle.remove()
        self.handles.clear()
        self.order_handles.clear()
        for name, wrapper in self.wrappers.items():
            wrapper.remove_hooks()
            attn = self.modules[name]
            original = self.originals[name]
            while isinstance(original, ProbeProcessor) and original._removed:  # an outer probe closed first
                original = original.inner
            if attn.processor is wrapper:
                attn.set_processor(original)
                continue
            for outer in self._chain(attn.processor):  # a probe opened inside this one is still installed
                if isinstance(outer, ProbeProcessor) and outer.inner is wrapper:
                    outer.inner = original
                    break
        self.wrappers.clear()

    # -------------------------------------------------------------- hooks
    def _on_encode(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        given = self._call_arguments()
        if not given:
            return  # the text encoder ran outside a pipeline call (encode_prompt, attnprobe.text): not this call's
        if self.calls_in_generation > 0:  # a new pipeline call begins by encoding its prompts
            self.calls_in_generation = 0
            self.encoded = []
            self.given = None
        if self.given is None:  # read the call's arguments before the pipeline overwrites them with embeddings
            self.given = given
        if isinstance(ids, torch.Tensor):
            self.encoded.append(ids.detach().to("cpu"))

    @staticmethod
    def _chain(processor):
        """The processor and every ProbeProcessor it wraps (a probe inside another probe wraps its wrapper)."""
        while True:
            yield processor
            if not isinstance(processor, ProbeProcessor):
                return
            processor = processor.inner

    def _check_intact(self) -> None:
        for name, attn in self.modules.items():
            if not any(p is self.wrappers[name] for p in self._chain(attn.processor)):
                raise ProbeError(
                    f"the processor of site {name} was replaced during the probe by "
                    f"{type(attn.processor).__name__} (attention slicing, fuse_qkv_projections, "
                    "set_default_attn_processor, xformers or a LoRA/adapter load do this). Enable such options "
                    "before opening the probe, not inside it. "
                    + (f"The store holds calls 0..{self.call} only." if self.call >= 0 else "The store holds no call.")
                )

    def _check_previous_call(self) -> None:
        if self.call < 0:
            return
        missing = [n for n in self.modules if n not in self.seen]
        if missing:
            raise self._missing_sites(self.call, missing)

    def _missing_sites(self, call: int, missing: list[str]) -> ProbeError:
        return ProbeError(
            f"denoiser call {call} ran without {len(missing)} of the {len(self.modules)} probed sites "
            f"(e.g. {missing[:3]}): their processors were bypassed or replaced. The store keeps calls 0..{call - 1}."
        )

    def _on_denoiser_call(self, module, args, kwargs):
        self._check_intact()
        self._check_previous_call()
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        states = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if isinstance(states, (tuple, list)) and states:  # IP-Adapter: (text states, image-prompt states)
            states = states[0]
        if not isinstance(sample, torch.Tensor) or sample.ndim != 4:
            raise ProbeError(
                f"the denoiser {type(module).__name__} was called without a 4-D latent sample "
                f"(got {type(sample).__name__}); attnprobe supports UNet denoisers called as diffusers pipelines do"
            )
        if isinstance(timestep, torch.Tensor):
            t = float(timestep.reshape(-1)[0]) if timestep.numel() else float("nan")
        else:
            t = float(timestep) if timestep is not None else float("nan")
        hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        if self.calls_in_generation > 0 and self._starts_generation(int(sample.shape[0]), t, hw):
            self.calls_in_generation = 0
            self.encoded = []  # no text-encoder call announced this pipeline call (prompt_embeds passed)
            self.given = None
        if self.calls_in_generation == 0:
            self.generation += 1
            self._set_layout(int(sample.shape[0]), int(states.shape[1]) if isinstance(states, torch.Tensor) else 0, hw)
        self.call += 1
        self.calls_in_generation += 1
        self.last_timestep = t
        self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        self.rows = self.rows.to(sample.device)
        self.store.calls.append(Call(index=self.call, timestep=t, generation=self.generation, layout=self.layout))
        self.seen = []
        self._note_interventions(module)

    def _starts_generation(self, batch: int, timestep: float, hw: tuple[int, int]) -> bool:
        """Whether this denoiser call starts a new pipeline call although no text encoder ran before it.

        Schedulers count down: a timestep above the previous call's, a scheduler step index back at 0, or another
        batch size means a new pipeline call.
        """
        if batch != len(self.layout) or timestep > self.last_timestep or hw != self.latent_hw:
            return True
        scheduler = getattr(self.pipe, "scheduler", None)
        if scheduler is not None and isinstance(getattr(type(scheduler), "step_index", None), property):
            return scheduler.step_index in (None, 0)
        return False

    def _grid(self, site: str, n_query: int) -> tuple[int, int]:
        h, w = self.latent_hw
        key = (site, n_query, h, w)
        if key not in self.grids:
            grid = None
            for k in range(8):
                f = 2**k
                gh, gw = math.ceil(h / f), math.ceil(w / f)
                if gh * gw == n_query:
                    grid = (gh, gw)
                    break
            if grid is None:
                warnings.warn(
                    f"site {site}: {n_query} queries do not factor into the {h}×{w} latent grid at any "
                    "power-of-two scale (token merging?); its maps are kept flat as [qh=1, qw=query]",
                    stacklevel=2,
                )
                self.store.flat_sites.add(site)
                grid = (1, n_query)
            self.grids[key] = grid
        return self.grids[key]

    @torch.no_grad()
    def _on_probs(self, site, attn, query, key, mask) -> None:
        if self.call < 0:
            return  # a site ran outside a denoiser call: nothing to key it by
        if site in self.seen:
            raise ProbeError(f"site {site} ran twice in denoiser call {self.call}; attnprobe expects one run per call")
        self.seen.append(site)
        probs = attention_probs(attn, query, key, mask, self.rows)  # [sample, head, query, token]
        if self.heads == "mean":
            probs = probs.mean(dim=1, keepdim=True)
        qh, qw = self._grid(site, probs.shape[2])
        probs = rearrange(probs, "sample head (qh qw) token -> sample head qh qw token", qh=qh, qw=qw)
        self.store._append(site, probs.to(dtype=self.dtype).to(self.device))

    # -------------------------------------------------------------- batch layout
    def _guidance_on(self) -> bool:
        if self.pipe is None:
            return False
        try:
            return bool(self.pipe.do_classifier_free_guidance)
        except Exception:  # pipelines without the property, or not set yet
            scale = getattr(self.pipe, "_guidance_scale", None)
            return bool(scale is not None and scale > 1)

    def _call_arguments(self) -> dict:
        """What the pipeline call in progress was given, read from its ``__call__`` frame (empty if not found):
        ``prompt`` and ``negative_prompt`` (lists of texts or None), and whether ``prompt_embeds`` and
        ``negative_prompt_embeds`` were passed."""
        frame = inspect.currentframe()
        try:
            for _ in range(200):
                frame = frame.f_back if frame is not None else None
                if frame is None:
                    break
                owner = frame.f_locals.get("self") if frame.f_code.co_name == "__call__" else None
                if owner is not None and self.pipe is None and any(
                    getattr(owner, a, None) is self.denoiser for a in ("unet", "transformer", "prior")
                ):
                    self.pipe = owner  # the denoiser was probed on its own, but a pipeline is driving it
                    self.encoder, self.tokenizer = self._primary_text_encoder()
                if owner is not None and owner is self.pipe:
                    loc = frame.f_locals
                    prompt_2 = _as_list(loc.get("prompt_2"))
                    if prompt_2 is not None and prompt_2 != _as_list(loc.get("prompt")):
                        warnings.warn(
                            "prompt_2 differs from prompt: token labels follow the first tokenizer's prompt; the "
                            "second encoder's half of the conditioning came from prompt_2",
                            stacklevel=2,
                        )
                    return {
                        "prompt": _as_list(loc.get("prompt")),
                        "negative_prompt": _as_list(loc.get("negative_prompt")),
                        "prompt_embeds": loc.get("prompt_embeds") is not None,
                        "negative_prompt_embeds": loc.get("negative_prompt_embeds") is not None,
                    }
        finally:
            del frame
        return {}

    def _layout_for(self, text: str | None, ids: list[int] | None, n_keys: int, source: str) -> TokenLayout:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "is_fast", False):
            return unlabelled_layout(n_keys, source="none")
        if text is not None:
            lay = token_layout(tok, text, n_keys, source=source)
            if ids is None or lay.ids == ids:
                return lay
            if source == "caller":
                raise ProbeError(
                    f"probe(prompts=...) says {text!r}, but the text encoder saw {decode_ids(tok, ids)!r}: "
                    "give the texts of the prompts the pipeline encodes"
                )
        if ids is not None:
            lay = token_layout(tok, decode_ids(tok, ids), n_keys, source="decoded")
            if lay.ids == ids:
                return lay
            strings = [(s.removesuffix("</w>") or s) for s in tok.convert_ids_to_tokens(ids)]
            if len(strings) == n_keys:
                return TokenLayout(strings=strings, kinds=["unknown"] * n_keys, ids=ids, source="ids")
        return unlabelled_layout(n_keys, source="none")

    def _set_layout(self, batch: int, n_keys: int, hw: tuple[int, int] = (0, 0)) -> None:
        given = self.given if self.given is not None else self._call_arguments()  # may find the driving pipeline
        cfg = self._guidance_on()
        if cfg and batch % 2:
            raise ProbeError(f"classifier-free guidance is on but the denoiser batch has an odd size {batch}")
        n = batch // 2 if cfg else batch
        labels = ["uncond"] * n + ["cond"] * n if cfg else ["cond"] * batch
        # diffusers encodes the prompt, then the negative prompt, skipping whichever came as embeddings
        encoded = list(self.encoded)
        cond_ids = None if given.get("prompt_embeds") else (encoded.pop(0) if encoded else None)
        uncond_ids = encoded.pop(0) if cfg and encoded and not given.get("negative_prompt_embeds") else None
        zeros = bool(
            cfg and given and not given["negative_prompt_embeds"] and given["negative_prompt"] is None
            and getattr(getattr(self.pipe, "config", None), "force_zeros_for_empty_prompt", False)
        )
        frame_negative = given.get("negative_prompt")
        cond_texts = self.caller_prompts or given.get("prompt")
        n_prompts = cond_ids.shape[0] if cond_ids is not None else len(cond_texts) if cond_texts else n
        if self.caller_prompts is not None and (len(self.caller_prompts) != n_prompts or n % n_prompts):
            raise ProbeError(
                f"probe(prompts=...) gave {len(self.caller_prompts)} texts, but this pipeline call encodes "
                f"{n_prompts} prompts ({n} conditional rows): give one text per prompt"
            )
        if cond_texts is not None and len(cond_texts) != n_prompts:
            cond_texts = None
        if n_prompts == 0 or n % n_prompts:
            n_prompts = n
            cond_texts, cond_ids = None, None
        per_prompt = n // n_prompts
        neg_texts = frame_negative
        if uncond_ids is not None and neg_texts is None:
            neg_texts = [""] * n_prompts  # diffusers encodes "" when no negative prompt is given
        if neg_texts is not None and len(neg_texts) == 1 and n_prompts > 1:
            neg_texts = neg_texts * n_prompts
        if neg_texts is not None and len(neg_texts) != n_prompts:
            neg_texts = None
        if uncond_ids is not None and uncond_ids.shape[0] != n_prompts:
            uncond_ids = None

        keep = [i for i, lab in enumerate(labels) if self.passes == "all" or lab == self.passes]
        if not keep:
            raise ProbeError(
                f"passes={self.passes!r} but this pipeline call has no {self.passes} pass: its batch of {batch} "
                f"rows is all {set(labels)} (guidance ≤ 1 or a distilled model runs no unconditional pass). "
                "Use passes='cond' or 'all'."
            )
        layouts: dict[tuple[str, int], TokenLayout] = {}
        samples, sample_layouts = [], []
        for row in keep:
            label = labels[row]
            j = row - n if (cfg and label == "cond") else row
            prompt_index, image_index = divmod(j, per_prompt)
            if (label, prompt_index) not in layouts:
                texts, ids = (cond_texts, cond_ids) if label == "cond" else (neg_texts, uncond_ids)
                text = texts[prompt_index] if texts is not None else None
                id_list = ids[prompt_index].tolist() if ids is not None else None
                source = "caller" if (label == "cond" and self.caller_prompts) else "prompt"
                if label == "uncond" and ids is None and text is None:
                    layouts[(label, prompt_index)] = unlabelled_layout(n_keys, source="zeros" if zeros else "none")
                else:
                    layouts[(label, prompt_index)] = self._layout_for(text, id_list, n_keys, source)
            lay = layouts[(label, prompt_index)]
            samples.append(Sample(len(samples), label, prompt_index, image_index, row, lay.text))
            sample_layouts.append(lay)

        key = (tuple(labels), tuple((s.pass_label, s.prompt_index, s.image_index, s.text) for s in samples), hw, n_keys)
        if self.sample_key is not None and key != self.sample_key:
            raise ProbeError(
                f"this probe holds generation 0 with samples {list(self.sample_key[1])} on a "
                f"{self.sample_key[2][0]}×{self.sample_key[2][1]} latent; pipeline call {self.generation} has "
                f"{list(key[1])} on {hw[0]}×{hw[1]}. One store holds one sample layout and size: open a new probe() "
                "for each pipeline call with other prompts, batch sizes or image sizes."
            )
        self.layout = tuple(labels)
        self.rows = torch.tensor(keep, dtype=torch.long)
        if self.sample_key is None:
            self.sample_key = key
            self.store.samples[:] = samples
            self.store._layouts[:] = sample_layouts
            self.store.meta["prompts"] = cond_texts
            self.store.meta["negative_prompts"] = neg_texts
            self.store.meta["num_images_per_prompt"] = per_prompt
            self.store.meta["guidance"] = cfg

    def _note_interventions(self, denoiser) -> None:
        """``meta["interventions"]``: every intervention active during a denoiser call (``attnprobe.intervene``
        lists them on the denoiser while its block is open); empty when the maps show an unedited run."""
        notes = self.store.meta.setdefault("interventions", [])
        for note in getattr(denoiser, "_attnprobe_interventions", ()):
            if note not in notes:
                notes.append(note)

    # -------------------------------------------------------------- metadata
    def _meta(self) -> dict:
        import diffusers
        import transformers

        pipe = self.pipe
        return {
            "pipeline": type(pipe).__name__ if pipe is not None else None,
            "denoiser": type(self.denoiser).__name__,
            "denoiser_config": {k: v for k, v in dict(getattr(self.denoiser, "config", {})).items() if not k.startswith("_")},
            "versions": {
                "attnprobe": __version__,
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "capture": {
                "passes": self.passes,
                "heads": self.heads,
                "dtype": str(self.dtype).removeprefix("torch."),
                "sites": [s.name for s in self.sites],
            },
        }

    def finish(self, complete: bool) -> None:
        """Close the store: keep whole calls only, set execution order and metadata; when the block ended
        normally (``complete``), raise if the last call lacks a site or no call was seen."""
        store = self.store
        counts = [len(store._chunks[n]) + (store._maps[n].shape[0] if n in store._maps else 0) for n in self.modules]
        whole = min(counts + [len(store.calls)])
        partial = whole < len(store.calls)
        for name, count in zip(self.modules, counts):  # drop the maps of a call that did not finish
            extra = count - whole
            if extra > 0:
                del store._chunks[name][len(store._chunks[name]) - extra:]
        del store.calls[whole:]
        store.meta["complete"] = complete and not partial
        if self.order:
            _record_order(self.denoiser, self.order)
        rank = {n: i for i, n in enumerate(self.order)}
        store.sites = sorted(
            (replace(s, order=rank.get(s.name)) for s in store.sites), key=lambda s: rank.get(s.name, len(rank))
        )
        meta, pipe = store.meta, self.pipe
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None:
            meta["scheduler"] = type(scheduler).__name__
            meta["scheduler_config"] = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
            ts = getattr(scheduler, "timesteps", None)
            meta["timesteps"] = [float(t) for t in ts] if ts is not None else None
        h, w = self.latent_hw
        scale = int(getattr(pipe, "vae_scale_factor", 1) or 1) if pipe is not None else 1
        meta["latent_size"] = [h, w]
        meta["image_size"] = [h * scale, w * scale]
        store._consolidate()
        if complete and partial:
            raise self._missing_sites(whole, [n for n, c in zip(self.modules, counts) if c == whole])
        if complete and not store.calls:
            raise ProbeError(
                "the probe saw no denoiser call: call the pipeline inside the `with attnprobe.probe(pipe) as store:` block"
            )


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@contextlib.contextmanager
def probe(
    pipe,
    sites: SiteSelector = None,
    passes: str = "cond",
    heads: str = "keep",
    dtype: torch.dtype = torch.float16,
    device="cpu",
    prompts: Sequence[str] | None = None,
) -> Iterator[AttentionStore]:
    """Record the cross-attention probabilities of every denoiser call while the pipeline runs as usual.

    The pipeline's outputs are unchanged (bit-identical): the installed processors still compute every
    output; the probe only reads q and k and computes ``softmax(q·kᵀ·scale + mask)`` beside them, in fp32.

    Args:
        pipe: a diffusers pipeline (SD 1.x/2.x, SDXL and other UNet pipelines) or its denoiser module.
        sites: which sites: ``None`` (all cross-attention sites), a name, a glob (``"up_blocks.*"``), a list of
            them, or a predicate ``Site -> bool``. Default: ``None``.
        passes: ``"cond"`` (conditional rows only), ``"uncond"`` (unconditional rows of classifier-free
            guidance only) or ``"all"``. Default: ``"cond"``.
        heads: ``"keep"`` (every head) or ``"mean"`` (mean over heads; head axis of length 1). Default ``"keep"``.
        dtype: dtype the maps are kept in. Default: ``torch.float16``.
        device: where the maps are kept. Default: ``"cpu"``.
        prompts: texts that label the conditional samples when the pipeline is called with ``prompt_embeds``
            (no text-encoder call to observe). Default: ``None``.

    Yields:
        An ``AttentionStore``, filled while the block runs: ``store[site]`` is
        ``[call, sample, head, qh, qw, token]``, summing to 1 over ``token``.

    Raises:
        ProbeError: bad options; a processor was replaced during the run (attention slicing, fused QKV,
            xformers…); a site did not run; ``passes="uncond"`` with no unconditional pass; no denoiser call.
        NoSitesError, UnknownSiteError: see ``list_sites`` / ``select_sites``.

    Examples:
        >>> import attnprobe, torch
        >>> from attnprobe.testing import tiny_sd_pipeline
        >>> pipe = tiny_sd_pipeline()
        >>> with attnprobe.probe(pipe, sites="mid_block.*", passes="all") as store:
        ...     _ = pipe(["a dog", "a cat"], num_inference_steps=1, height=64, width=64, output_type="latent")
        >>> [(s.pass_label, s.prompt_index) for s in store.samples]
        [('uncond', 0), ('uncond', 1), ('cond', 0), ('cond', 1)]
    """
    if passes not in PASSES:
        raise ProbeError(f"passes={passes!r} is not one of {PASSES}")
    if heads not in HEADS:
        raise ProbeError(f"heads={heads!r} is not one of {HEADS}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ProbeError(f"dtype={dtype!r} is not a floating-point torch.dtype (e.g. torch.float16)")
    try:
        torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ProbeError(f"device={device!r} is not a torch device: {exc}") from None
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ProbeError(f"device={device!r}, but this torch sees no CUDA device: keep the maps on 'cpu'")
    if prompts is not None and _as_list(prompts) is None:
        raise ProbeError(f"prompts must be a string or a list of strings; got {type(prompts).__name__}")
    denoiser = denoiser_of(pipe)
    every = list_sites(denoiser)
    recorder = _Recorder(pipe, denoiser, select_sites(every, sites), passes, heads, dtype, device, prompts, every)
    if prompts is not None and recorder.tokenizer is None:
        raise ProbeError(
            f"prompts= needs a tokenizer to label positions, and {type(pipe).__name__} has none: pass the pipeline "
            "(its tokenizer is used), not its denoiser"
        )
    recorder.install()
    try:
        try:
            yield recorder.store
        except BaseException:
            recorder.finish(complete=False)  # keep whole calls only; the error that ended the block goes on
            raise
        recorder.finish(complete=True)
    finally:
        recorder.remove()
        recorder.store.meta = _json_safe(recorder.store.meta)
