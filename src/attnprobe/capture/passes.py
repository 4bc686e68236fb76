"""The passes of a denoiser batch: what ``Sample.pass_label`` can say, and how each diffusers pipeline orders them.

A guided diffusers pipeline concatenates its passes along the batch, each pass a block of one row per prompt and
image: ``[uncond × N, cond × N]`` for classifier-free guidance. Some pipelines add or reorder blocks; ``blocks``
names them for the pipeline call in progress, and ``refuse`` stops a probe before the first denoiser call of a
pipeline whose rows or calls attnprobe cannot label (rather than label them wrongly).

| pass | the rows | their text | pipelines |
|---|---|---|---|
| ``cond`` | conditioned on the prompt (and the input image, where there is one) | the prompt | all |
| ``uncond`` | classifier-free guidance's unconditional pass | the negative prompt (``""`` when none) | guided ones |
| ``safety`` | the safety-concept pass of Safe Latent Diffusion (Schramowski et al. 2023), one row per prompt and image (``prompt_index``: the prompt it guides) | the safety concept | ``StableDiffusionPipelineSafe`` |
| ``perturbed`` | perturbed-attention guidance (Ahn et al. 2024): self-attention of the PAG layers is the identity | the prompt | the ``*PAGPipeline`` classes, ``pag_scale > 0`` |
| ``image`` | InstructPix2Pix's image-only pass: the input image, no prompt | the negative prompt | ``*InstructPix2PixPipeline`` |
| ``unknown`` | a row whose ``encoder_hidden_states`` contradict the pass its position names (``capture.evidence``) | none (``prompt_index`` -1) | any, with a warning |

Most guided pipelines put the unconditional block first; those in ``PROMPT_FIRST`` (Lumina, Würstchen, Stable
Cascade) put the prompt's first (Z-Image: ``prompt_embeds + negative_prompt_embeds``, lists). Rows that contradict the order are caught by ``capture.evidence`` and labelled
``unknown``; pipelines that make separate denoiser calls per pass label each call as a whole (Flux true CFG).

    >>> blocks(object(), guidance=True)
    (('uncond', 'negative'), ('cond', 'prompt'))
"""

from __future__ import annotations

import math

from ..errors import ArgumentError, ProbeError

__all__ = ["PASS_LABELS", "REFUSED", "REWRITES", "PROMPT_FIRST", "blocks", "refuse", "refuse_rewrite", "guidance_on",
           "guider_on", "check_guidance"]

#: every pass label a store's samples can carry, with what its rows are
PASS_LABELS = {
    "cond": "conditioned on the prompt (and the input image, where there is one)",
    "uncond": "classifier-free guidance's unconditional pass: the negative prompt ('' when none)",
    "safety": "Safe Latent Diffusion's safety-concept pass (prompt_index: the prompt whose sample it guides)",
    "perturbed": "perturbed-attention guidance's pass: the prompt, with identity self-attention at the PAG layers",
    "image": "InstructPix2Pix's image-only pass: the input image and the negative prompt",
    "unknown": "a row whose conditioning contradicts the pass its position names (prompt_index -1); warned about",
}

#: pipelines whose denoiser calls attnprobe does not label, with when (a local of their ``__call__`` or a property
#: of the pipeline that is set; ``None``: always) and why (diffusers 0.42's pipelines/, read for how each builds its
#: denoiser batch)
REFUSED = {
    "LEditsPPPipelineStableDiffusion": (None, "adds a block of rows per editing prompt"),
    "LEditsPPPipelineStableDiffusionXL": (None, "adds a block of rows per editing prompt"),
    "SemanticStableDiffusionPipeline": ("enable_edit_guidance", "adds a block of rows per editing prompt"),
    "StableDiffusionParadigmsPipeline": (None, "batches several timesteps into one denoiser call"),
    "StableDiffusionSAGPipeline": ("do_self_attention_guidance", "runs extra denoiser calls on degraded latents"),
    "StableDiffusionAttendAndExcitePipeline": (None, "runs extra denoiser calls to take gradients of the attention"),
    "StableDiffusionPanoramaPipeline": (None, "runs one denoiser call per view of the panorama at every step"),
    "CycleDiffusionPipeline": (None, "batches the source and target prompts' passes into one denoiser call"),
    "StableDiffusionGLIGENTextImagePipeline": (None, "runs two denoiser calls per step, with and without grounding"),
    "StableDiffusionPix2PixZeroPipeline": (None, "runs a second denoising loop on edited conditioning, two calls a step"),
    "TextToVideoZeroPipeline": (None, "runs its denoising loop three times per pipeline call"),
    "TextToVideoZeroSDXLPipeline": (None, "runs its denoising loop three times per pipeline call"),
    "OmniGenPipeline": (None, "batches [cond, uncond, image-only] rows of its own multimodal tokenizer"),
    "UniDiffuserPipeline": (None, "conditions its unconditional pass on noise text, not on a negative prompt"),
    **{name: (None, "denoises a mel spectrogram with an image UNet: its queries are time × frequency positions, not an "
                    "image grid") for name in ("AudioLDMPipeline", "MusicLDMPipeline")},
    "AnyFlowFARPipeline": (None, "runs extra denoiser calls at t=0 to fill its key-value cache"),
    "DreamLitePipeline": ("image", "in edit mode batches [uncond, image-only, text] rows side by side with the image"),
    **{name: ("do_spatio_temporal_guidance", "runs extra spatio-temporal-guidance denoiser calls that skip blocks")
       for name in ("LTX2Pipeline", "LTX2ConditionPipeline", "LTX2ImageToVideoPipeline", "LTX2HDRPipeline",
                    "LTX2InContextPipeline")},
    **{name: (None, "gives each latent frame its own timestep (diffusion forcing: a [batch, frame] timestep per "
                    "denoiser call), while a store keeps one timestep per call")
       for name in ("SkyReelsV2DiffusionForcingPipeline", "SkyReelsV2DiffusionForcingImageToVideoPipeline",
                    "SkyReelsV2DiffusionForcingVideoToVideoPipeline")},
    "LTXImageToVideoPipeline": (None, "gives each video token its own timestep (its first latent frame, the input "
                                      "image, at 0), while a store keeps one timestep per call"),
    **{name: (None, "places every token by video_coords (conditioning frames and videos among the generated ones) "
                    "instead of the num_frames × height × width grid attnprobe reads LTX-Video's frames from")
       for name in ("LTXConditionPipeline", "LTXI2VLongMultiPromptPipeline")},
    "SanaImageToVideoPipeline": (None, "gives its input image's latent frame timestep 0 and the others the step's (a "
                                       "[batch, frame, …] timestep per denoiser call), while a store keeps one "
                                       "timestep per call; SanaVideoPipeline (text-to-video) is recorded"),
    "HunyuanVideo15ImageToVideoPipeline": (None, "puts the input image's SigLIP tokens (attended) before the text keys "
                                                 "and its latents in extra channels of the video's; no tiny pipeline "
                                                 "checks it: HunyuanVideo15Pipeline (text-to-video) is recorded"),
    "LongCatImageEditPipeline": (None, "reads the input image inside its text encoder's template (its vision tokens "
                                       "are text keys) and appends the image's latents to the image queries"),
}

#: pipelines that can rewrite the prompt with their text encoder before encoding it, with the argument of their
#: ``__call__`` that turns it on: their text keys are then the words of a generated text, not of the prompt
REWRITES = {"LongCatImagePipeline": "enable_prompt_rewrite"}

#: pipelines whose batch puts the prompt's block first: ``torch.cat([prompt_embeds, negative_prompt_embeds])``
PROMPT_FIRST = ("LuminaPipeline", "WuerstchenPriorPipeline", "WuerstchenDecoderPipeline",
                "StableCascadePriorPipeline", "StableCascadeDecoderPipeline", "ZImagePipeline")

_PIX2PIX = ("StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline")


def refuse(pipe, loc: dict) -> None:
    """Raise before the first denoiser call of a pipeline whose batch or calls attnprobe cannot label.

    Raises:
        ProbeError: the pipeline (``REFUSED``) runs, in this call, what attnprobe does not label; names the
            pipeline and why.
    """
    name = type(pipe).__name__
    if loc.get("skip_guidance_layers"):  # SD3's skip-layer guidance, on every SD3 pipeline that has it
        raise ProbeError(
            f"{name} with skip-layer guidance (skip_guidance_layers={loc['skip_guidance_layers']}) runs extra denoiser "
            "calls that skip blocks, which attnprobe does not label: run without skip_guidance_layers"
        )
    refuse_rewrite(pipe, loc)
    refused = _known(pipe, REFUSED)  # a subclass runs its base's recipe
    if refused is not None:
        name = refused if refused == name else f"{name} (a {refused})"
        when, why = REFUSED[refused]
        if when is None or _set(loc[when] if when in loc else _property(pipe, when)):
            raise ProbeError(
                f"{name} {why}, which attnprobe does not label: it refuses rather than record rows or calls under "
                "wrong labels. Probe the pipeline it derives from (e.g. StableDiffusionPipeline) instead"
                + (f", or run without what sets {when}" if when else "")
            )


def refuse_rewrite(pipe, loc: dict) -> None:
    """Raise where the pipeline call in progress rewrites its prompt with its text encoder (``REWRITES``), before the
    rewriting generates a word (the probe calls it at the text encoder's first call, and at the first denoiser call).

    Raises:
        ProbeError: the option is on; names it and how to study the rewritten prompt instead.
    """
    known = _known(pipe, REWRITES)
    option = REWRITES.get(known)
    if option is not None and option in loc and _set(loc[option]):
        raise ProbeError(
            f"{type(pipe).__name__} rewrites the prompt with its text encoder before encoding it ({option}="
            f"{loc[option]!r}; on by default): its text keys are the words of a generated text, not of the prompt, "
            f"and attnprobe refuses rather than label them from the prompt. Pass {option}=False; to study the "
            "rewritten prompt, make it first (pipe.rewire_prompt(prompt, pipe.device)) and pass it as the prompt"
        )


def blocks(pipe, guidance: bool, safety: bool = False) -> tuple[tuple[str, str], ...]:
    """The blocks of the pipeline call's denoiser batch in order, each ``(pass, text)`` where text is
    ``"prompt"``, ``"negative"`` (the negative prompt) or ``"safety"`` (SLD's safety concept).

    Args:
        pipe: the pipeline. guidance: classifier-free guidance runs in the batch.
        safety: Safe Latent Diffusion's safety-concept pass runs.
    """
    if _known(pipe, _PIX2PIX) is not None:  # torch.cat([prompt, negative, negative]) with [image, image, zeros]
        return (("cond", "prompt"), ("image", "negative"), ("uncond", "negative")) if guidance else (("cond", "prompt"),)
    out = (("uncond", "negative"), ("cond", "prompt")) if guidance else (("cond", "prompt"),)
    if guidance and _known(pipe, PROMPT_FIRST) is not None:
        out = out[::-1]
    if safety:
        out += (("safety", "safety"),)
    if _perturbed(pipe):  # PAG: torch.cat([cond] * 2), after the unconditional block
        out += (("perturbed", "prompt"),)
    return out


def _known(pipe, names) -> str | None:
    """The first class in the pipeline's MRO named in ``names`` (a user's subclass runs its base's recipe)."""
    return next((c.__name__ for c in type(pipe).__mro__ if c.__name__ in names), None)


def _perturbed(pipe) -> bool:
    return bool(_property(pipe, "do_perturbed_attention_guidance"))


def _property(pipe, name: str):
    try:
        return getattr(pipe, name, None)
    except Exception:  # a property its call has not set up yet (pag_scale, _stg_scale)
        return None


def _set(value) -> bool:
    """Whether a local or property turns a refused feature on: a true flag or number, or any object (an image)."""
    return value is not None and (bool(value) if isinstance(value, (bool, int, float)) else True)


def guidance_on(pipe, scale: float | None = None) -> bool | None:
    """Whether a pipeline runs classifier-free guidance in its call in progress (or its last one): its
    ``do_classifier_free_guidance``; without that property, whether ``scale`` (the call's ``guidance_scale``, when
    known) or else the pipeline's ``_guidance_scale`` is > 1; ``None`` when nothing says."""
    try:
        return bool(pipe.do_classifier_free_guidance)
    except Exception:  # pipelines without the property, or not set yet
        pass
    if scale is None:
        scale = getattr(pipe, "_guidance_scale", None)
    return None if scale is None else bool(scale > 1)


def guider_on(loc: dict | None) -> bool:
    """Whether a pipeline that guides through a diffusers guider (HunyuanImage: the ``guider`` local of its
    ``__call__``; HunyuanVideo 1.5: its ``self.guider``) runs an unconditional pass at the step in progress: the guider
    is enabled with two conditions."""
    loc = loc or {}
    guider = loc.get("guider", getattr(loc.get("self"), "guider", None))
    try:
        return bool(guider is not None and guider._enabled and guider.num_conditions > 1)
    except Exception:  # another guider API: nothing says
        return False


def check_guidance(guidance) -> float:
    """A classifier-free guidance scale (a setting of a study or an evaluation) as a float.

    Raises:
        ArgumentError (a ValueError): not a number, not finite, or < 0 (says what was given).
    """
    try:
        value = float(guidance)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(guidance, bool) or not math.isfinite(value) or value < 0:
        raise ArgumentError(f"guidance must be a finite number ≥ 0; got {guidance}")
    return value
