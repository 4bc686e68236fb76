"""Wan 2.2's two experts: a pipeline whose denoiser calls are shared between ``transformer`` (the high-noise expert:
timesteps at or above ``boundary_ratio × num_train_timesteps``) and ``transformer_2`` (the low-noise expert), recorded
into one store.

    >>> import attnprobe
    >>> from attnprobe.testing import tiny_pipeline
    >>> pipe = tiny_pipeline("wan2.2")
    >>> with attnprobe.probe(pipe, heads="mean") as store:
    ...     _ = pipe(prompt="a dog", num_frames=5, height=32, width=32, num_inference_steps=4,
    ...              max_sequence_length=16, guidance_scale=1.0, output_type="latent")
    >>> [store.meta["experts"]["calls"][str(c.index)] for c in store.calls]
    ['transformer', 'transformer', 'transformer_2', 'transformer_2']

Both experts have the same architecture, so their sites have the same names (``blocks.i.attn2``); every site of the
first is wrapped on the second too, with its own wrapper (its own verify-once check), and both carry the pre- and
post-forward hooks that count denoiser calls, so the call index, timestep and pass of a call are those of the
pipeline call whichever expert runs it. ``store.meta["experts"]``:

- ``names``: ``["transformer", "transformer_2"]``; ``boundary_ratio`` and ``boundary_timestep`` (the pipeline's);
- ``calls``: ``{str(call index): expert}`` for every call the store holds (``Call.index``);
- ``processor_check``: ``{expert: {site: check}}`` of the experts after the first (the first's is
  ``meta["processor_check"]``, as for one denoiser).

Refused (``ProbeError``, before the pipeline runs): experts whose cross-attention sites differ (names, kinds or heads),
as one store's site axis could not label both; one module registered as both experts; experts of different classes
(``families.wan``). A probe of one expert alone is refused at its first call (``families.wan.refuse_lone_expert``).
"""

from __future__ import annotations

import torch

from ..errors import ProbeError
from .cross import chain
from .evidence import note_checks
from .kinds import restore_processor, set_processor, wrap_processor
from .recorder import Recorder
from .sites import list_sites

__all__ = ["ExpertsRecorder", "experts_of"]

#: the pipeline attributes of the experts, the first being the denoiser ``denoiser_of`` finds
EXPERTS = ("transformer", "transformer_2")


def experts_of(pipe, denoiser) -> dict[str, torch.nn.Module]:
    """The experts of a pipeline (``{attribute: module}``) when it has a second one (Wan 2.2's ``transformer_2``),
    else ``{}``.

    Raises:
        ProbeError: the second expert's cross-attention sites are not the first's (what each has is named).
    """
    if pipe is denoiser or getattr(pipe, "transformer_2", None) is None or getattr(pipe, "transformer", None) is not denoiser:
        return {}
    experts = {name: getattr(pipe, name) for name in EXPERTS}
    if experts["transformer_2"] is denoiser:
        raise ProbeError(f"{type(pipe).__name__}'s transformer_2 is its transformer, one module for both experts: which "
                         "expert ran a call cannot be told. Give each expert its own module")
    first, second = ([(s.name, s.kind, s.heads) for s in list_sites(m)] for m in experts.values())
    if first != second:
        only = sorted(set(first) ^ set(second))
        raise ProbeError(
            f"{type(pipe).__name__}'s two experts have different cross-attention sites ({len(first)} in transformer, "
            f"{len(second)} in transformer_2; (name, kind, heads) in only one of them: {only[:4]}): one store's sites "
            "cannot label both. Probe a pipeline whose experts share their architecture"
        )
    return experts


class _Expert:
    """A second expert's wrapped sites: ``modules``, ``originals`` and ``wrappers`` by site name, and whether each site's
    projections were fused when the probe opened."""

    def __init__(self, module: torch.nn.Module, names) -> None:
        self.module = module
        self.modules = {name: module.get_submodule(name) for name in names}
        self.fused = {name: bool(getattr(attn, "fused_projections", False)) for name, attn in self.modules.items()}
        self.originals: dict = {}
        self.wrappers: dict = {}


class ExpertsRecorder(Recorder):
    """A ``Recorder`` over two experts: the first is its ``denoiser``; the others' sites are wrapped alike and their
    calls counted by the same hooks. ``experts``: ``experts_of``'s answer; the rest: ``Recorder``'s arguments."""

    def __init__(self, experts: dict[str, torch.nn.Module], *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.experts = experts
        names = list(experts)
        self.first = names[0]
        self.others = {name: _Expert(experts[name], self.modules) for name in names[1:]}
        self.expert_names = {id(module): name for name, module in experts.items()}
        self.call_expert: str | None = None  # the expert of the denoiser call in progress (or last)
        ratio = getattr(getattr(self.pipe, "config", None), "boundary_ratio", None)
        train = getattr(getattr(getattr(self.pipe, "scheduler", None), "config", None), "num_train_timesteps", None)
        self.store.meta["experts"] = {
            "names": names, "boundary_ratio": ratio,
            "boundary_timestep": float(ratio * train) if ratio is not None and train is not None else None,
            "calls": {}, "processor_check": {name: {} for name in names[1:]},
        }

    def install(self) -> None:
        super().install()
        try:
            for expert in self.others.values():
                for name, attn in expert.modules.items():
                    original = attn.processor
                    wrapper = wrap_processor(original, name, attn, self.state, self.kinds[name], self.family)
                    expert.originals[name], expert.wrappers[name] = original, wrapper
                    set_processor(attn, wrapper)
                self.handles.append(expert.module.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True))
                self.handles.append(expert.module.register_forward_hook(self._on_denoiser_return))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        super().remove()
        for expert in self.others.values():
            for name, wrapper in expert.wrappers.items():
                restore_processor(expert.modules[name], wrapper, expert.originals[name])
            expert.wrappers.clear()

    def _replaced_experts(self) -> list[str]:
        """The experts the pipeline no longer holds (``pipe.transformer_2 = …`` inside the probe): their calls would run
        unhooked, and the store would miss them without a word."""
        return [name for name, module in self.experts.items() if getattr(self.pipe, name, None) is not module]

    def _check_intact(self) -> None:
        replaced = self._replaced_experts()
        if replaced:
            raise ProbeError(
                f"{type(self.pipe).__name__}.{replaced[0]} was replaced during the probe: the new expert's denoiser "
                "calls are not hooked, so the store would miss them. Swap experts before opening the probe, not inside "
                "it. " + (f"The store holds calls 0..{self.call} only." if self.call >= 0 else "The store holds no call.")
            )
        super()._check_intact()
        for label, expert in self.others.items():
            for name, attn in expert.modules.items():
                if (not any(p is expert.wrappers[name] for p in chain(attn.processor))
                        or bool(getattr(attn, "fused_projections", False)) != expert.fused[name]):
                    raise ProbeError(
                        f"the processor or projections of site {name} of {label} were changed during the probe (now "
                        f"{type(attn.processor).__name__}; attention slicing, fuse_qkv_projections, "
                        "set_default_attn_processor, xformers or a LoRA/adapter load do this). Enable such options "
                        "before opening the probe, not inside it. "
                        + (f"The store holds calls 0..{self.call} only." if self.call >= 0 else "The store holds no call.")
                    )

    @torch.compiler.disable
    def _on_denoiser_call(self, module, args, kwargs):
        super()._on_denoiser_call(module, args, kwargs)
        self.call_expert = self.expert_names[id(module)]  # after the previous call was closed under its own

    def finish(self, complete: bool) -> None:
        replaced = self._replaced_experts()  # after the last hooked call: its calls ran unseen
        super().finish(complete and not replaced)
        if replaced:
            self.store.meta["complete"] = False
            raise ProbeError(f"{type(self.pipe).__name__}.{replaced[0]} was replaced during the probe: the calls it ran "
                             "are not in the store (it keeps those of the experts it hooked; meta['complete'] is False)")

    def _close_call(self) -> None:
        call, expert = self.current_call, self.call_expert
        super()._close_call()
        if call is not None:  # handed on whole: its expert is recorded
            self.store.meta["experts"]["calls"][str(call.index)] = expert

    def _checked(self) -> None:
        """The verify-once checks of the sites that ran: the first expert's in ``meta["processor_check"]``, another's in
        ``meta["experts"]["processor_check"][expert]``."""
        if self.call_expert in (None, self.first):
            return super()._checked()
        checks, self.state.checks[:] = list(self.state.checks), []
        record = self.store.meta["experts"]["processor_check"][self.call_expert]
        if checks and note_checks(record, checks):
            self.store.meta["row_evidence"] = "contradicted"

