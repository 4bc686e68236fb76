"""ConceptAttention (Helbling et al. 2025, arXiv 2502.04320): output-space concept maps of a Flux or SD3
transformer, with the raw cross-attention of the same words beside them.

    >>> import attnprobe
    >>> from attnprobe.testing import tiny_flux_pipeline
    >>> pipe = tiny_flux_pipeline()
    >>> with attnprobe.concept_attention(pipe, ["dog", "sky"], max_sequence_length=16) as result:
    ...     _ = pipe(prompt="a dog", num_inference_steps=2, height=64, width=64, max_sequence_length=16,
    ...              output_type="latent")
    >>> tuple(result.maps.shape)           # [call, sample, concept, qh, qw]
    (2, 1, 2, 4, 4)
    >>> bool(result.cross_attention[:, :, 1].isnan().all())  # "sky" is not in the prompt
    True
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from ..capture import probe
from ..capture.concepts import ConceptRecord, concept_stream
from ..errors import (ArgumentError, ConceptError, NoDenoiserCallError, ProbeError, SampleLayoutError, SelectionError,
                      warn)
from ..store.axes import as_index
from ..store import AttentionStore
from ..text.tokens import concept_pattern

__all__ = ["concept_attention", "ConceptMaps"]


@dataclass
class ConceptMaps:
    """What ``concept_attention`` measured; filled while its ``with`` block runs (each property reads what has been
    recorded so far).

    Attributes:
        concepts: the concept words (the ``concept`` axis). blocks: the double-stream blocks averaged (module paths,
            the ``block`` axis). record: the concept stream's ``ConceptRecord``. store: the probe of the same blocks
            (``heads="mean"``, ``joint="renorm"``, float32; ``None`` with ``compare=False``).
    """

    concepts: tuple[str, ...]
    blocks: tuple[str, ...]
    record: ConceptRecord
    store: AttentionStore | None = None

    @property
    def block_maps(self) -> torch.Tensor:
        """``[call, block, sample, concept, qh, qw]`` float32: per denoiser call and block,
        ``softmax over concept (o_x · o_cᵀ)`` (each image position sums to 1 over ``concept``).

        Raises:
            ProbeError: no denoiser call was recorded, or the calls' grids differ (several image sizes: use one
                ``with`` block per size).
        """
        calls = self.record.calls
        if not calls:
            raise ProbeError("concept_attention recorded no denoiser call: call the pipeline inside the with block")
        shapes = {tuple(c.shape) for c in calls}
        if len(shapes) > 1:
            raise ProbeError(f"concept_attention: the calls' maps differ in shape {sorted(shapes)} (batch or image "
                             "size changed between pipeline calls); use one with block per size")
        return torch.stack(calls)

    @property
    def maps(self) -> torch.Tensor:
        """``[call, sample, concept, qh, qw]`` float32: ``block_maps`` averaged over the blocks; sums to 1 over
        ``concept`` per image position."""
        return self.block_maps.mean(dim=1)

    @property
    def timesteps(self) -> list[float]:
        """The transformer's ``timestep`` per call (Flux: the scheduler's ``t / 1000``; SD3: the scheduler's ``t``)."""
        return list(self.record.timesteps)

    @property
    def cross_attention(self) -> torch.Tensor | None:
        """The raw cross-attention of the same words, for comparison: ``[call, sample, concept, qh, qw]`` float32,
        the image's attention to the concept's prompt tokens (every occurrence, each position's tokens summed), as a
        share of the softmax over the prompt's text keys (``joint="renorm"``: rows sum to 1 over the text), averaged
        over heads and the same blocks' joint sites. NaN for a concept that is not a word of that sample's prompt
        (ConceptAttention's concepts need not be). ``None`` with ``compare=False``.

        A concept finds the prompt's words case-insensitively, as every concept lookup of attnprobe does
        (``AttentionStore.token_indices``): ``"dog"`` sums the tokens of the prompt's ``"Dog"``. The concept map
        encodes the word as given, and T5 is case-sensitive (``"▁dog"`` and ``"▁Dog"`` are other tokens), so where
        the prompt spells a concept otherwise an ``AttnprobeWarning`` names the spellings: pass the concept as the
        prompt spells it for both to read the same word.

        Raises:
            ProbeError: the probe's calls or samples do not line up with the concept stream's.
        """
        store = self.store
        if store is None:
            return None
        maps = self.block_maps
        n_call, _, n_sample, n_concept, qh, qw = maps.shape
        if len(store.calls) != n_call or len(store.samples) != n_sample:
            raise ProbeError(f"concept_attention: the probe kept {len(store.calls)} calls × {len(store.samples)} "
                             f"samples, the concept stream {n_call} × {n_sample}; they cannot be compared")
        sites = [f"{b}.attn" for b in self.blocks]
        out = torch.full((n_call, n_sample, n_concept, qh, qw), float("nan"))
        spelled: dict[str, dict[str, list[int]]] = {}  # concept -> another spelling in a prompt -> its samples
        for s in range(n_sample):
            for k, concept in enumerate(self.concepts):
                try:
                    found = store.token_indices(s, concept)
                except ConceptError:
                    continue  # not a prompt word: NaN
                for other in _other_spellings(concept, store.samples[s].text):
                    spelled.setdefault(concept, {}).setdefault(other, []).append(s)
                positions = sorted({p for occurrence in found for p in occurrence})
                mass = [store.maps(site, samples=[s], tokens=positions).float().sum(-1).mean(2)[:, 0] for site in sites]
                out[:, s, k] = torch.stack(mass).mean(0)
        for concept, others in spelled.items():
            where = "; ".join(f"{other!r} (samples {samples})" for other, samples in others.items())
            warn(f"concept_attention: cross_attention of the concept {concept!r} sums the prompt's {where} (concepts "
                 f"match prompt words case-insensitively), but its concept map encodes {concept!r} as given, and T5 "
                 "is case-sensitive (other tokens): pass the concept as the prompt spells it for both to read the "
                 "same word")
        return out

    def heatmap(self, concept: str, sample: int | None = None) -> torch.Tensor:
        """One concept's map ``[qh, qw]``: ``maps`` averaged over the calls (the paper averages over blocks and
        timesteps).

        Args:
            concept: one of ``concepts``. sample: the calls' batch row; ``None``: the first conditional row (SD3 with
                guidance batches ``[unconditional; conditional]``: row ``batch // 2``; else row 0).

        Raises:
            ArgumentError: not one of ``concepts``; a sample that is not an int. SelectionError (an ``IndexError``): no
                such sample.
        """
        if concept not in self.concepts:
            raise ArgumentError(f"concept {concept!r} was not measured; the concepts are {list(self.concepts)}")
        maps = self.maps
        if sample is None:
            sample = maps.shape[1] // 2 if all(self.record.batch_cfg) else 0
        if as_index(sample) is None:
            raise ArgumentError(f"sample={sample!r}: give a batch row (an int) or None (the first conditional row)")
        if not -maps.shape[1] <= as_index(sample) < maps.shape[1]:
            raise SelectionError(f"sample {sample}: the calls have {maps.shape[1]} batch rows (0..{maps.shape[1] - 1})")
        times = self.record.timesteps
        if any(a == b for a, b in zip(times, times[1:])):  # Flux true CFG: a conditional and an unconditional call a step
            warn("concept_attention: consecutive denoiser calls share a timestep (separate conditional and "
                 "unconditional calls: Flux's true CFG), and heatmap averages both; select calls from maps "
                 "(maps[::2] holds the conditional ones)")
        return maps[:, as_index(sample), self.concepts.index(concept)].mean(0)

    def __repr__(self) -> str:  # not every recorded tensor
        return (f"ConceptMaps(concepts={list(self.concepts)}, blocks={len(self.blocks)}, "
                f"calls={len(self.record.calls)}, compare={self.store is not None})")


def _other_spellings(concept: str, text: str | None) -> list[str]:
    """The spellings of ``concept`` in ``text`` that differ from it (its words matched case-insensitively, as
    ``find_concept`` does; whitespace between words aside), in text order, each once."""
    if text is None:
        return []
    given = " ".join(concept.split())
    matched = (" ".join(m.group(0).split()) for m in concept_pattern(concept).finditer(text))
    return list(dict.fromkeys(m for m in matched if m != given))


@contextlib.contextmanager
def concept_attention(pipe, concepts: Sequence[str], *, blocks=None, compare: bool = True,
                      max_sequence_length: int | None = None) -> Iterator[ConceptMaps]:
    """ConceptAttention's output-space concept maps (Helbling et al. 2025, "ConceptAttention: Diffusion Transformers
    Learn Highly Interpretable Features", arXiv 2502.04320) for the pipeline calls made inside the ``with`` block.

    Each concept word (it need not be in the prompt) is encoded alone by the pipeline's own text encoder, keeps the
    first position of its T5 states, and is carried through the double-stream blocks with each block's text-stream weights, attending to
    ``[concept; image]`` keys; the image and the prompt never attend to it, so the generated images are
    bit-identical. In each block, ``softmax over concept (o_x · o_cᵀ)`` of the image's and the concepts' attention
    outputs says which concept each image position is (``attnprobe.capture.concepts``, docs/concept-attention.md).

    Args:
        pipe: a Flux or SD3 pipeline (``FluxPipeline``, ``StableDiffusion3Pipeline`` or another built on
            ``FluxTransformer2DModel`` / ``SD3Transformer2DModel``; SD3.5 too). ``FluxKontextPipeline``: the maps
            (and the cross-attention beside them) cover the generated image; its input image's tokens are keys only.
        concepts: concept words, e.g. ``["dog", "grass", "sky"]``; each once, each encodable by the tokenizer.
        blocks: which double-stream blocks to average: ``None`` (all), an index, a module path
            (``"transformer_blocks.18"``) or a list of them. The paper's Flux figures use ``range(15, 19)``.
            Default ``None``.
        compare: also probe the same blocks' joint sites (``heads="mean"``, ``joint="renorm"``, float32, every
            batch row) for ``ConceptMaps.cross_attention``. It keeps ``N × T`` values per block and call (Flux-dev at
            1024 px: 8 MB per block and call); ``False`` keeps none. Flux true CFG runs unconditional calls the probe
            cannot hold beside the conditional ones (``ProbeError`` at the first such call): pass ``False`` there.
            Default ``True``.
        max_sequence_length: the length the concepts are padded to when encoded (pass the pipeline call's value).
            Default ``None``: the pipeline's own default (FluxPipeline's 512, StableDiffusion3Pipeline's 256).

    Yields:
        ``ConceptMaps``: ``maps`` ``[call, sample, concept, qh, qw]`` (sums to 1 over ``concept``), ``block_maps``
        ``[call, block, sample, concept, qh, qw]``, ``cross_attention`` ``[call, sample, concept, qh, qw]`` (NaN for
        words not in the prompt), ``heatmap(concept)`` ``[qh, qw]``. ``call`` counts every denoiser call inside the
        block; ``sample`` is the call's batch row (SD3 with guidance: ``[uncond, cond]``; ``store.samples`` labels
        them when ``compare`` is on).

    Raises:
        ProbeError: a pipeline whose denoiser is not Flux's or SD3's transformer (a UNet, PixArt, …; names what is
            supported), fused projections, an attention processor other than the family's plain one
            (``FluxAttnProcessor``, ``JointAttnProcessor2_0``), attention kwargs (a mask, IP-Adapter), ControlNet
            residuals or SD3's skipped layers (skip-layer guidance) at run time.
        ArgumentError: no concepts, an empty or repeated concept, a block that does not exist, a bad
            ``max_sequence_length``.
        ConceptError: a concept the tokenizer cannot encode (only special tokens or an unknown piece).

    Examples:
        >>> import attnprobe, torch
        >>> from attnprobe.testing import tiny_flux_pipeline
        >>> pipe = tiny_flux_pipeline()
        >>> with attnprobe.concept_attention(pipe, ["dog", "grass"], max_sequence_length=16) as result:
        ...     _ = pipe(prompt="a dog on grass", num_inference_steps=1, height=64, width=96,
        ...              max_sequence_length=16, output_type="latent")
        >>> torch.allclose(result.maps.sum(2), torch.ones(1, 1, 4, 6))
        True
    """
    if isinstance(concepts, (list, tuple)) and len(concepts) == 1:
        warn(f"concept_attention({list(concepts)}): the maps are a softmax over the concepts, so one concept's map is 1 "
             "everywhere; pass the others it competes with (e.g. ['dog', 'grass', 'sky']; the paper adds 'background')")
    with concept_stream(pipe, concepts, blocks, max_sequence_length) as record:
        result = ConceptMaps(record.concepts, record.blocks, record)
        if not compare:
            yield result
            return
        sites = [f"{b}.attn" for b in record.blocks]
        try:
            with probe(pipe, sites=sites, passes="all", heads="mean", dtype=torch.float32, joint="renorm") as store:
                result.store = store
                yield result
        except NoDenoiserCallError:
            if record.calls:
                raise
            return  # an empty block: as with compare=False (the result's maps say nothing was recorded)
        except SampleLayoutError as exc:
            # the comparison's probe holds one sample layout: say what to do here, not in the probe's words
            raise SampleLayoutError(f"concept_attention(compare=True) compares with a probe of the same blocks, which "
                                    f"holds one pipeline call's prompts and size: {exc}. Pass compare=False (the concept "
                                    "maps alone), or use one with block per pipeline call") from exc
