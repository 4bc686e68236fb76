"""Shared fixtures: tiny pipelines (built once per test module), a seeded runner, an independent recorder of
attention-module inputs, and a check that a probe left nothing behind.

The independent reference never touches attnprobe: our own forward hook (``with_kwargs=True``) on each
``attn2`` module keeps ``hidden_states`` / ``encoder_hidden_states`` / ``attention_mask``; the probabilities are
then recomputed as ``softmax(to_q(h) · to_k(e)ᵀ · attn.scale + mask)`` in float64.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers.models.attention_processor import Attention

from attnprobe.capture.cross import ProbeProcessor
from attnprobe.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

# Small and fast: 64×64 px (8×8 latents), two denoiser steps, no VAE decode.
FAST = dict(height=64, width=64, num_inference_steps=2, output_type="latent")


@pytest.fixture(scope="module")
def sd_pipe():
    """Tiny SD 1.5-layout pipeline (fp32, DDIM). Tests that change it must put it back."""
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl_pipe():
    """Tiny SDXL-layout pipeline (fp32, Euler, force_zeros_for_empty_prompt=True)."""
    return tiny_sdxl_pipeline(seed=0)


@pytest.fixture
def run():
    """``run(pipe, prompt, **overrides)``: call a pipeline with FAST defaults and a generator seeded with 0."""

    def _run(pipe, prompt="a picture of dog", seed=0, **kwargs):
        options = dict(FAST, generator=torch.Generator().manual_seed(seed))
        options.update(kwargs)
        return pipe(prompt, **options)

    return _run


class AttnInputs:
    """Per attention module, the inputs of each of its calls, kept by our own forward hooks.

        with AttnInputs(pipe.unet, names) as seen:
            pipe(...)
        seen.probs(name, call)   # float64 [batch, head, query, token]
    """

    def __init__(self, denoiser: torch.nn.Module, names):
        self.modules = {n: denoiser.get_submodule(n) for n in names}
        self.inputs = {n: [] for n in self.modules}
        self._handles = []

    def __enter__(self):
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(partial(self._keep, name), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _keep(self, name, module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        states = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        mask = kwargs.get("attention_mask")
        keep = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        self.inputs[name].append((keep(hidden), keep(states), keep(mask)))

    def calls(self, name) -> int:
        return len(self.inputs[name])

    @torch.no_grad()
    def probs(self, name: str, call: int) -> torch.Tensor:
        """``softmax(q·kᵀ·scale + mask)`` in float64, ``[batch, head, query, token]``."""
        attn = self.modules[name]
        hidden, states, mask = self.inputs[name][call]
        q = attn.to_q(hidden).double()
        k = attn.to_k(states).double()
        b, n_q, _ = q.shape
        n_k = k.shape[1]
        q = q.reshape(b, n_q, attn.heads, -1).transpose(1, 2)
        k = k.reshape(b, n_k, attn.heads, -1).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) * attn.scale
        if mask is not None:  # UNet2DConditionModel passes an additive bias [batch, 1, token]
            logits = logits + mask.double().reshape(b, 1, -1, n_k)
        return logits.softmax(dim=-1)


@pytest.fixture
def attn_inputs():
    """The ``AttnInputs`` class (an independent recorder of attention-module inputs)."""
    return AttnInputs


@pytest.fixture
def check_maps():
    """``check_maps(store, seen, names=None, atol=1e-6)``: every stored map equals the independent recompute
    of its own batch row (``Sample.row``), call by call; returns the largest difference."""

    def _check(store, seen: AttnInputs, names=None, atol=1e-6):
        worst = 0.0
        for name in names or list(seen.modules):
            maps = store[name]  # [call, sample, head, qh, qw, token]
            assert seen.calls(name) == maps.shape[0] == len(store.calls), name
            for call in range(maps.shape[0]):
                ref = seen.probs(name, call)  # [batch, head, query, token]
                for sample in store.samples:
                    want = ref[sample.row]
                    if maps.shape[2] == 1 and ref.shape[1] > 1:  # heads="mean"
                        want = want.mean(dim=0, keepdim=True)
                    got = maps[call, sample.index].double()
                    diff = (got - want.reshape(got.shape)).abs().max().item()
                    assert diff <= atol, f"{name} call {call} sample {sample}: max diff {diff:.3g}"
                    worst = max(worst, diff)
        return worst

    return _check


def attention_modules(pipe):
    return {n: m for n, m in pipe.unet.named_modules() if isinstance(m, Attention)}


@pytest.fixture
def assert_clean():
    """``assert_clean(pipe, before=None)``: no probe wrapper, no forward hook on any q/k/kv projection, no
    pre-forward hook on the denoiser or text encoders; with ``before`` (``{name: processor}`` from
    ``processors_of``), every attention module has exactly that processor object again."""

    def _check(pipe, before=None):
        for name, attn in attention_modules(pipe).items():
            assert not isinstance(attn.processor, ProbeProcessor), name
            for proj in ("to_q", "to_k", "to_v", "to_kv", "to_qkv"):
                layer = getattr(attn, proj, None)
                if layer is not None:
                    assert not layer._forward_hooks, f"{name}.{proj} still has hooks"
            if before is not None:
                assert attn.processor is before[name], f"{name}: processor not restored"
        assert not pipe.unet._forward_pre_hooks
        for enc in ("text_encoder", "text_encoder_2"):
            module = getattr(pipe, enc, None)
            if module is not None:
                assert not module._forward_pre_hooks, enc

    return _check


@pytest.fixture
def processors_of():
    """``processors_of(pipe)`` → ``{module name: processor object}`` for every attention module."""
    return lambda pipe: {n: m.processor for n, m in attention_modules(pipe).items()}
