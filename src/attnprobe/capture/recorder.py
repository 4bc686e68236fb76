"""The ``Recorder`` behind ``probe()`` (``attnprobe.capture.entry``): record every cross-attention map of a diffusers
pipeline while it generates as usual.

How it works: each selected site's installed processor is wrapped (``kinds.wrap_processor``), which computes the
site's maps beside the processor and leaves them in a shared outbox; a pre-forward hook on the denoiser counts
denoiser calls and reads the timestep and the latent size (``denoiser_call``); a forward hook on it hands the call's
maps on when the denoiser returns (``sink.CallSink``: the store's ``StoreWriter``, or a running aggregate), so
``store.calls`` is complete inside the ``with`` block after each pipeline call; a pre-forward hook on each text encoder
whose positions are the text keys records the token ids each pipeline call encodes, from which ``rows.BatchRows``
labels the batch rows. The hooks run outside ``torch.compile``'s trace and the wrappers read only values that stay
fixed between calls, so a compiled denoiser does not recompile after its first generation. Everything is removed
in ``finally``, also when generation raises.
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch

from ..errors import NoDenoiserCallError, ProbeError, warn
from ..store import Call, StoreWriter
from .cross import ProbeProcessor, chain
from .denoiser_call import DenoiserCall, Timesteps, packed_grid, query_grid, row_mask, schedule_meta
from .batch_frames import fold_frames, frame_record, frame_rows, latent_states
from .evidence import EncodeWatch, note_checks
from .families import family_of
from .frames import call_video, check_budget, frame_maps, kept_calls, packed_call_video, store_bytes, video_meta
from .families.wan import refuse_lone_expert
from .kinds import restore_processor, set_processor, wrap_processor
from .processor import CaptureState
from .options import capture_meta
from .passes import refuse_rewrite
from .relations import Relations, relation_modules
from .rows import BatchRows
from .selection import call_filter, check_tokens, concept_gaps, resolve_tokens
from .sink import CallSink
from .sites import record_order

__all__ = ["Recorder"]


def _other_texts(given: dict, before: dict) -> bool:
    """Whether a text encode's pipeline arguments name other prompts than the encodes before it in the same pipeline
    call: another ``prompt``, or another ``negative_prompt`` than one it filled in (Kandinsky 5 sets a default
    negative prompt for ``None``, then repeats one text per prompt, between its two encodes)."""
    if given.get("prompt") != before.get("prompt"):
        return True
    now, then = given.get("negative_prompt"), before.get("negative_prompt")
    return then is not None and now != then and set(now or ()) != set(then)

class Recorder:
    """The state of one probe: installed wrappers and hooks, the call counter, and the objects it hands work to
    (``rows``: the batch labels; ``sink``: where each call's maps go; ``writer``: the store)."""

    def __init__(self, pipe, denoiser, sites, passes, heads, dtype, device, prompts, all_sites=(),
                 calls=None, tokens=None, aggregate=None, stream_to=None, joint="exact", relations=(), points=()):
        self.denoiser = denoiser
        self.experts: dict = {}  # Wan 2.2: each expert denoiser by its pipeline attribute (``experts.ExpertsRecorder``)
        self.family = family_of(denoiser)
        # a UNet hands its encoder_hidden_states to its cross sites unchanged (unless it projects them first)
        self.same_states = self.family.name == "unet" and getattr(denoiser, "encoder_hid_proj", None) is None
        self.rows = BatchRows(pipe if pipe is not denoiser else None, denoiser, passes, prompts)
        self.encode_watch = EncodeWatch(self.rows.pipe, self._on_encode_prompt)
        self.rows.as_given = self.encode_watch.as_given
        self.fill: tuple[int, torch.Tensor] | None = None  # samples with a row in this call, when not all have one
        self.latent_rows = None  # the latent batch rows recorded (``state.rows`` of an image denoiser)
        self.nan_calls = 0  # kept calls in which no sample had a row
        self.states = None  # the conditioning of the last denoiser call
        self.sites = sites
        self.passes = passes
        self.heads = heads
        self.dtype = dtype
        self.device = torch.device(device)
        self.modules = {s.name: denoiser.get_submodule(s.name) for s in sites}
        # projections fused or not when the probe opened (fusing keeps Flux's processor, so check this too)
        self._fused = {name: bool(getattr(attn, "fused_projections", False)) for name, attn in self.modules.items()}
        self.all_sites = [s.name for s in all_sites] or list(self.modules)
        self.known = {s.name: s.order for s in all_sites}
        self.known_order = bool(self.known) and None not in self.known.values()  # seen by an earlier probe
        self.state = CaptureState(heads=heads, dtype=torch.float32 if aggregate else dtype, joint=joint,
                                  extra_keys=self.family.registers(denoiser) if self.family.registers else 0,
                                  pad_to=self.family.pad_to)
        self.joint = joint
        self.kinds = {s.name: s.kind for s in sites}
        if relations and self.family.frames_in_batch:
            raise ProbeError(f"relations= is not read for {self.family.title}: its sites' rows are frames of samples")
        modules = relation_modules(denoiser, self.family, sites, relations)
        self.relate = self.state.relate = Relations(relations, points, modules, self._relation_budget) if modules else None
        self.shares: list[tuple[int, str, torch.Tensor]] = []  # (call, site, [sample, head]) of joint sites
        self.ids_key: tuple | None = None  # Flux: the img_ids tensor the latent size was read from, and that size
        self.calls_spec, self.keep_call = calls, call_filter(calls)
        self.tokens_spec = check_tokens(tokens)
        self.aggregate = aggregate
        self.current: dict[str, torch.Tensor] = {}  # the maps of the denoiser call in progress
        self.current_call: Call | None = None
        self.timesteps = Timesteps()
        self.order_handles = []
        self.originals: dict[str, object] = {}
        self.wrappers: dict[str, ProbeProcessor] = {}
        self.handles = []
        self.call = -1
        self.generation = -1
        self.calls_in_generation = 0
        self.running = False  # a denoiser call started and has not returned
        self.layout: tuple[str, ...] = ()
        self.last_timestep = float("inf")
        self.latent_hw: tuple[int, int] = (0, 0)
        self.order: list[str] = []
        self.grids: dict[tuple[str, int, int, int], tuple[int, int]] = {}
        self.video: tuple | None = None  # a video denoiser's call: (latent frames, patch, (qt, qh, qw))
        meta = capture_meta(self.pipe, denoiser, self.family.name, passes=passes, heads=heads, dtype=dtype, sites=sites,
                            calls=calls, tokens=self.tokens_spec, aggregate=aggregate, stream_to=stream_to,
                            joint=joint if any(k != "cross" for k in self.kinds.values()) else None)
        self.writer = StoreWriter(sites, meta, folder=stream_to)
        self.store = self.writer.store
        self.sink = CallSink(self.writer, self.device, aggregate)

    @property
    def pipe(self):
        """The pipeline driving the denoiser (found when it first runs, if the denoiser was probed on its own)."""
        return self.rows.pipe

    # -------------------------------------------------------------- install / remove
    def install(self) -> None:
        try:
            for name, attn in self.modules.items():
                original = attn.processor
                wrapper = wrap_processor(original, name, attn, self.state, self.kinds[name], self.family)
                self.originals[name] = original
                self.wrappers[name] = wrapper
                set_processor(attn, wrapper)
            self.handles.append(self.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True))
            # a call is closed when the denoiser returns, so store.calls is right inside the with block
            self.handles.append(self.denoiser.register_forward_hook(self._on_denoiser_return))
            # execution order of every cross-attention site (not only the probed ones), during the first call
            # (once per denoiser: hooks added and removed change what a compiled denoiser guards on)
            for name in self.all_sites if not self.known_order else ():
                hook = functools.partial(self._on_site_order, name)
                self.order_handles.append(self.denoiser.get_submodule(name).register_forward_pre_hook(hook))
            if self.order_handles:
                self.order_handles.append(self.denoiser.register_forward_hook(self._after_first_call))
            for i, (encoder, _) in enumerate(self.rows.streams):
                hook = functools.partial(self._on_encode, i)
                self.handles.append(encoder.register_forward_pre_hook(hook, with_kwargs=True))
            self.encode_watch.install()
            if self.relate is not None:
                self.relate.install(self.denoiser, self.state)
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
        self.state.workspace.clear()
        self.state.pending.drop()
        self.state.pending.buffers.clear()
        self.encode_watch.remove()
        if self.relate is not None:
            self.relate.remove(self.denoiser)
        for handle in self.handles + self.order_handles:
            handle.remove()
        self.handles.clear()
        self.order_handles.clear()
        for name, wrapper in self.wrappers.items():
            restore_processor(self.modules[name], wrapper, self.originals[name])
        self.wrappers.clear()

    # -------------------------------------------------------------- hooks
    @torch.compiler.disable
    def _on_encode(self, stream, module, args, kwargs):
        given = self.rows.call_arguments()
        if self._not_this_calls(given):
            return
        refuse_rewrite(self.pipe, self.rows.pipe_locals() or {})  # before the pipeline's text encoder rewrites its prompt
        # a new pipeline call begins by encoding its prompts; one with other prompts may follow a call that failed
        # after encoding (its ids must not label this one). Only the texts tell: a pipeline that encodes its negative
        # prompt in a second encode_prompt (Qwen-Image, HunyuanImage) has set its prompt_embeds local by then
        if self.calls_in_generation > 0 or (self.rows.given is not None and _other_texts(given, self.rows.given)):
            self.calls_in_generation = 0
            self.rows.new_pipeline_call()
        self.rows.encoded_ids(stream, args[0] if args else kwargs.get("input_ids"), given)

    def _not_this_calls(self, given: dict) -> bool:
        """Whether an encode is not the conditioning of a pipeline call: it ran outside one (``encode_prompt`` to make
        ``prompt_embeds``, ``attnprobe.text``) or inside its denoising loop (a callback that re-encodes a prompt; the
        denoiser calls themselves show that conditioning)."""
        return not given or (self.calls_in_generation > 0 and self.rows.in_loop())

    @torch.compiler.disable
    def _on_encode_prompt(self, output) -> None:
        if self._not_this_calls(self.rows.call_arguments()):
            return
        if self.calls_in_generation > 0:  # no text encoder ran before it (prompt_embeds passed): a new call
            self.calls_in_generation = 0
            self.rows.new_pipeline_call()
        self.rows.encoded_prompt(output)

    def _check_intact(self) -> None:
        replaced = self.relate.replaced(self.denoiser) if self.relate is not None else {}
        for name, attn in {**self.modules, **replaced}.items():
            processor = attn.processor  # the wrapper itself, unless a nested probe wrapped it again
            if (name in replaced or (processor is not self.wrappers[name]
                                     and not any(p is self.wrappers[name] for p in chain(processor)))
                    or bool(getattr(attn, "fused_projections", False)) != self._fused[name]):
                raise ProbeError(
                    f"the processor or projections of {'module' if name in replaced else 'site'} {name}"
                    f"{' (read for relations=)' if name in replaced else ''} were changed during the probe (now "
                    f"{type(attn.processor).__name__}; attention slicing, fuse_qkv_projections, "
                    "set_default_attn_processor, xformers or a LoRA/adapter load do this). Enable such options "
                    "before opening the probe, not inside it. "
                    + (f"The store holds calls 0..{self.call} only." if self.call >= 0 else "The store holds no call.")
                )

    def _close_call(self) -> None:
        """The denoiser call in progress is over: check that every probed site ran, hand its maps on."""
        self._collect()
        call, maps = self.current_call, self.current
        self.current_call, self.current = None, {}
        if call is None:
            return  # not kept (calls=...), or no call yet
        missing = self._missing(maps) + (self.relate.missing(call.index) if self.relate is not None else [])
        if missing:
            raise self._missing_sites(call.index, missing)
        self.sink.put(call, maps)
        self.nan_calls += self.fill is not None and not len(self.fill[1])  # no sample had a row: all NaN

    def _missing(self, maps: dict) -> list[str]:
        return [n for n in self.modules if n not in maps]

    def _missing_sites(self, call: int, missing: list[str]) -> ProbeError:
        return ProbeError(
            f"denoiser call {call} ran without {len(missing)} of the {len(self.modules)} probed sites "
            f"(e.g. {missing[:3]}): their processors were bypassed or replaced. The store keeps calls 0..{call - 1}."
        )

    @torch.compiler.disable
    def _on_denoiser_return(self, module, args, output) -> None:
        """The denoiser call is over (it returned): its maps go to the sink now, not at the next call."""
        self.running = False
        self._close_call()

    def _drop_unfinished(self) -> None:
        """The last denoiser call never returned (an exception inside it, caught by the caller): its partial maps are
        dropped, with a warning, and the probe goes on with the next call."""
        self.running = False
        if self.current_call is not None:
            warn(f"denoiser call {self.call} did not finish (an exception inside the denoiser?): its partial maps are "
                 "dropped; the store keeps the calls that finished")
        self.current_call, self.current = None, {}
        self._collect()  # with no call in progress: the partial maps dropped, the sites' verify-once checks kept

    @torch.compiler.disable
    def _on_denoiser_call(self, module, args, kwargs):
        self._check_intact()
        if self.running:
            self._drop_unfinished()
        self.running = True
        self._close_call()
        if self.call < 0 and not self.experts:  # a denoiser probed on its own that shares its pipeline call
            refuse_lone_expert(self.pipe, module)
        call = DenoiserCall.read(args, kwargs)
        fold = self.family.frames_in_batch  # AnimateDiff: frames folded into the sites' batch (capture.batch_frames)
        if fold and isinstance(call.sample, torch.Tensor) and call.sample.ndim == 5:
            call.states = latent_states(call.states, call.batch, int(call.sample.shape[2]), type(module).__name__)
        packed = self.family.packed_video is not None  # LTX-Video: packed tokens, their grid as arguments
        call.check(module, kernel=self.family.reader == "kernel", video=self.family.video is not None,
                   packed_video=packed)
        t = self.timesteps.value(call.timestep, getattr(self.pipe, "scheduler", None))
        if packed:
            self.video, hw = packed_call_video(self.family, module, call.sample, kwargs)
        else:
            hw = call.latent_hw(self._packed_hw, self.family.channels_last)
            self.video = call_video(self.family, module, call.sample, hw)  # a video denoiser's frames, patch, grid
        self.state.text_len = call.text_len
        self.state.row_text = call.mask.sum(-1) if self.family.row_text and call.mask is not None else None
        self.state.row_mask = row_mask(module, call) if self.family.row_calls else None
        self.state.image_len = self.family.image_len(module, hw) if self.family.image_len else 0
        self.state.keys_after = self.family.keys_after(module, kwargs) if self.family.keys_after else 0
        self.state.text_order = self.family.text_order(module, kwargs) if self.family.text_order else None
        self.state.states = call.states if self.same_states else None
        uncond_call = self.rows.separate and self.rows.uncond_call(call.states)
        self.state.n_keys = call.text_len if self.rows.separate else self.state.n_keys  # each pass its own length
        if self.calls_in_generation > 0 and not uncond_call and self.rows.starts_pipeline_call(
                t, self.last_timestep, hw, self.latent_hw):
            self.calls_in_generation = 0
            self.rows.new_pipeline_call()  # no text-encoder call announced it (prompt_embeds)
        if self.calls_in_generation == 0:
            self.generation += 1
            if self.relate is not None:
                self.relate.first, self.relate.latent_hw = True, hw
            self.rows.mark_first_call()  # the pipeline line of a generation's first call: a conditional one (true CFG)
            n_keys = call.text_len
            self._start_generation(self.rows.label(call.batch, n_keys, hw, self.generation, call.states), call, n_keys)
        elif not self.rows.separate and (call.batch != len(self.layout) or call.states is not self.states):
            self.layout, present = self.rows.rows_in(call.batch, call.states, self.store.samples)
            self._rows_changed(present)
        elif self.rows.separate and call.states is not self.states:
            present = self.rows.separate_rows(call.states, "uncond" if uncond_call else "cond", self.store.samples)
            if present is not None:
                self._rows_changed(present)
        self.states = call.states
        self.call += 1
        self.calls_in_generation += 1
        self.last_timestep = t
        self.latent_hw = hw
        state = self.state
        if fold:  # the kept samples' (row, frame) rows
            state.rows = frame_rows(self.latent_rows, self.video[0])
        for name in ("rows", "tokens"):  # on the device the maps are computed on (moved once, not per call)
            value = getattr(state, name)
            if isinstance(value, torch.Tensor) and value.device != call.sample.device:
                setattr(state, name, value.to(call.sample.device))
        state.keep = self.keep_call is None or bool(self.keep_call(self.calls_in_generation - 1, t))
        layout = self.layout
        if self.rows.separate:  # Flux true CFG: a whole call is one pass
            label = "uncond" if uncond_call else "cond"
            layout = (label,) * len(self.layout)
            state.keep = state.keep and label == self.passes
        if state.keep:
            self.current_call = Call(index=self.call, timestep=t, generation=self.generation, layout=layout)
        self._note_interventions(module)

    def _start_generation(self, labels, call: DenoiserCall, n_keys: int) -> None:
        """A pipeline call's first denoiser call: the rows to record; the first pipeline call's samples, token
        positions and metadata go into the store."""
        self.layout = labels.passes
        self._set_rows(labels.keep)
        self.state.n_keys = n_keys
        positions = None
        if labels.first and self.tokens_spec is not None:
            positions = resolve_tokens(self.tokens_spec, labels.layouts,
                                       len(labels.layouts[0].strings) if labels.layouts else n_keys)
            self.state.tokens = torch.tensor(positions, dtype=torch.long)
            for concept, missing in concept_gaps(self.tokens_spec, labels.samples, labels.layouts).items():
                warn(f"tokens={concept!r} is not in the prompt of sample(s) {missing} (e.g. "
                     f"{labels.samples[missing[0]].text!r}): the token axis keeps the positions of every sample's "
                     "occurrences, so at those samples they hold other words (store.tokens(sample) names them)")
        if self.video is not None:  # the token axis: the kept positions, else every text key
            self._video_generation(len(labels.keep),
                                   len(positions) if positions is not None else self.store.n_tokens or n_keys)
        if not labels.first:
            return
        self.writer.set_samples(labels.samples, labels.layouts, positions)
        self.store.meta.update(labels.meta)
        if call.mask is not None:  # PixArt: the T5 padding mask (1 = attended)
            rows = [smp.row for smp in labels.samples]
            self.store.meta["text_mask"] = call.mask.reshape(call.mask.shape[0], -1)[rows].to(torch.int).tolist()
        # a streamed store is readable from its first shard on, also after a crash
        self.writer.write_header({**self.store.meta, "complete": False})

    def _video_generation(self, samples: int, tokens: int) -> None:
        """A video pipeline call starts: its frames are the store's (``meta["video"]``), and its maps fit."""
        frames, patch, grid = self.video
        meta = video_meta(self.pipe, frames, patch, grid)
        meta = frame_record(meta) if self.family.frames_in_batch else meta
        if self.store.meta.setdefault("video", meta)["qt"] != meta["qt"]:
            raise ProbeError(f"this pipeline call's latents have {frames} frames ({meta['qt']} query frames), the "
                             f"store's first had {self.store.meta['video']['qt']}: one store holds one frame count")
        need = store_bytes(self.sites, samples, grid, tokens, self.heads, self.state.dtype, 1)
        separate = (self.passes == "uncond") if self.rows.separate else None  # Wan: a call per pass, the prompt's first
        calls = 1 if self.aggregate else kept_calls(getattr(self.pipe, "scheduler", None), self.keep_call, separate)
        check_budget(need, calls, self.device, self.store.folder, self.aggregate)

    def _relation_budget(self, need: int) -> None:
        """Refuse a pipeline call whose relations (``need`` bytes a call) would not fit in memory."""
        check_budget(need, kept_calls(getattr(self.pipe, "scheduler", None), self.keep_call), self.device)

    def _set_rows(self, present: list[int | None]) -> None:
        """The batch row of each store sample in the denoiser calls from now on (``None``: it has none)."""
        rows = [r for r in present if r is not None] or [0]  # none left: compute one row, store only NaN
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        self.state.rows = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, dtype=torch.long)
        self.latent_rows = self.state.rows  # frames_in_batch: the sites' rows are their frames' (frame_rows)
        self.fill = None
        if None in present:
            self.fill = (len(present), torch.tensor([i for i, r in enumerate(present) if r is not None], dtype=torch.long))

    def _rows_changed(self, present: list[int | None]) -> None:
        """The batch or the conditioning changed inside a pipeline call (``callback_on_step_end`` switched guidance
        off or edited ``prompt_embeds``): each sample's row from now on, NaN where it has none."""
        self._set_rows(present)
        if self.fill is not None and self.aggregate:
            raise ProbeError(
                f"aggregate={self.aggregate!r}, but from denoiser call {self.call + 1} on samples "
                f"{[i for i, r in enumerate(present) if r is None]} have no row (guidance switched off inside the "
                "pipeline call?): an aggregate cannot average a sample over calls it is missing from. Record without "
                "aggregate=, or with passes='cond'."
            )

    def _filled(self, values: torch.Tensor) -> torch.Tensor:
        """``[row, ...]`` of the rows a call has → ``[sample, ...]``, NaN for the samples without a row."""
        if self.fill is None:
            return values
        n, present = self.fill
        full = values.new_full((n, *values.shape[1:]), float("nan"))
        if len(present):
            full[present.to(values.device)] = values
        return full

    def _packed_hw(self, img_ids: torch.Tensor) -> tuple[int, int]:
        """``packed_grid`` read once per ``img_ids`` tensor (reading GPU ids synchronises)."""
        key = (img_ids.data_ptr(), tuple(img_ids.shape))
        if self.ids_key is None or self.ids_key[0] != key:
            self.ids_key = (key, packed_grid(img_ids))
        return self.ids_key[1]

    def _grid(self, site: str, n_query: int) -> tuple[int, int]:
        h, w = self.latent_hw
        key = (site, n_query, h, w)
        if key not in self.grids:
            grid = query_grid(n_query, (h, w))
            if grid is None:
                warn(
                    f"site {site}: {n_query} queries do not factor into the {h}×{w} latent grid at any "
                    "power-of-two scale (token merging?); its maps are kept flat as [qh=1, qw=query]",
                )
                self.writer.add_flat_site(site)
                grid = (1, n_query)
            self.grids[key] = grid
        return self.grids[key]

    def _collect(self) -> None:
        """Take the maps the wrappers left in ``state.outbox`` (``[sample, head, query, token]``, fp32)."""
        outbox, state = self.state.outbox, self.state
        if self.current_call is None:
            outbox.clear()  # sites that ran outside a kept denoiser call: nothing to key them by
            state.pending.drop()
            if self.relate is not None:
                self.relate.collect(None, self._filled, self.device)
            self.state.shares.clear()
            self._checked()
            return
        for site, share in self.state.shares:
            self.shares.append((self.call, site, self._filled(share)))
        self.state.shares.clear()
        self._checked()
        outbox += state.pending.finish(state.heads, state.tokens, state.dtype, state.workspace)
        fold = self.family.frames_in_batch
        for site, probs in outbox:
            if site in self.current:
                raise ProbeError(f"site {site} ran twice in denoiser call {self.call}; attnprobe expects one run per call")
            # [sample, head, (qh qw) | (qt qh qw), token] -> its grid, in the store's dtype (fp32 for an aggregate)
            if fold:  # AnimateDiff: [sample·frame, head, query, token] -> [sample, head, qt, qh, qw, token]
                self.current[site] = self._filled(fold_frames(probs, self.video[0], self._grid(site, probs.shape[2])))
                continue
            grid = self._grid(site, probs.shape[2]) if self.video is None else None  # a video's: frames.frame_maps
            # reshape, not Tensor.unflatten (a Python function: ~2 µs a site call more)
            self.current[site] = self._filled(probs.reshape(*probs.shape[:2], *grid, probs.shape[-1]) if grid
                                              else frame_maps(site, probs, self.video))
        outbox.clear()
        if self.relate is not None:
            self.relate.collect(self.call, self._filled, self.device)

    def _checked(self) -> None:
        checks, self.state.checks[:] = list(self.state.checks), []  # cleared first: the warning may be an error
        if checks and note_checks(self.store.meta.setdefault("processor_check", {}), checks):
            self.store.meta["row_evidence"] = "contradicted"

    def _note_interventions(self, denoiser) -> None:
        """``meta["interventions"]``: every intervention active during a denoiser call (``attnprobe.intervene``
        lists them on the denoiser while its block is open); empty when the maps show an unedited run."""
        notes = self.store.meta.setdefault("interventions", [])
        for note in getattr(denoiser, "_attnprobe_interventions", ()):
            if note not in notes:
                notes.append(note)

    def finish(self, complete: bool) -> None:
        """Close the store: keep whole calls only, set execution order and metadata; when the block ended
        normally (``complete``), raise if the last call lacks a site or no call was seen."""
        store, error = self.store, None
        self._collect()
        if self.current_call is not None:
            missing = self._missing(self.current)
            if not missing:
                self._close_call()
            else:  # the call in progress did not finish: drop it
                if complete:
                    error = self._missing_sites(self.current_call.index, missing)
                self.current_call, self.current = None, {}
        self.sink.close(self.dtype, self.layout)
        kept = {c.index for c in store.calls}
        if self.relate is not None:
            maps, store.meta["relations"] = self.relate.finish([c.index for c in store.calls])
            self.writer.set_relations(maps)
        if self.joint == "exact" and any(k != "cross" for k in self.kinds.values()):  # [call][sample][head] per site
            store.meta["text_share"] = {
                name: [[[round(v, 7) for v in row] for row in share.float().cpu().tolist()]
                       for call, site, share in self.shares if site == name and call in kept]
                for name, kind in self.kinds.items() if kind != "cross"
            }
        self.shares.clear()
        checks = store.meta.setdefault("processor_check", {})
        for name, kind in self.kinds.items():  # joint sites, compiled runs, sites that never ran recorded
            checks.setdefault(name, {"processor": type(self.originals.get(name)).__name__, "verdict": "not checked",
                                     "relative_error": None, "tolerance": None, "conditioning": "not checked"})
        store.meta["complete"] = complete and error is None
        if store.calls and self.nan_calls == len(store.calls):
            warn(f"every kept denoiser call holds only NaN: no sample of passes={self.rows.passes!r} had a row in them "
                 "(the pass was cut inside the pipeline call, e.g. Z-Image's cfg_truncation, before calls=)")
        if self.order:
            record_order(self.denoiser, self.order)
        order = self.order or (sorted(self.known, key=self.known.get) if self.known_order else [])
        rank = {n: i for i, n in enumerate(order)}
        sites = sorted(
            (replace(s, order=rank.get(s.name)) for s in store.sites), key=lambda s: rank.get(s.name, len(rank))
        )
        meta = store.meta
        meta.update(schedule_meta(self.pipe, self.latent_hw))
        self.writer.finish(sites)
        if error is not None:
            raise error
        if complete and not store.calls:
            if self.call >= 0:
                raise ProbeError(
                    f"calls={self.calls_spec!r} kept none of the {self.calls_in_generation} denoiser calls of the "
                    f"pipeline call (indices 0..{self.calls_in_generation - 1}, timesteps counting down from "
                    f"{meta['timesteps'][0] if meta.get('timesteps') else '?'})"
                )
            raise NoDenoiserCallError(
                "the probe saw no denoiser call: call the pipeline inside the `with attnprobe.probe(pipe) as store:` block"
            )
