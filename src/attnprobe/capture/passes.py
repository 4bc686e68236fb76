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

    >>> blocks(object(), guidance=True)
    (('uncond', 'negative'), ('cond', 'prompt'))
"""

from __future__ import annotations

from ..errors import ProbeError

__all__ = ["PASS_LABELS", "REFUSED", "blocks", "refuse"]

#: every pass label a store's samples can carry, with what its rows are
PASS_LABELS = {
    "cond": "conditioned on the prompt (and the input image, where there is one)",
    "uncond": "classifier-free guidance's unconditional pass: the negative prompt ('' when none)",
    "safety": "Safe Latent Diffusion's safety-concept pass (prompt_index: the prompt whose sample it guides)",
    "perturbed": "perturbed-attention guidance's pass: the prompt, with identity self-attention at the PAG layers",
    "image": "InstructPix2Pix's image-only pass: the input image and the negative prompt",
    "unknown": "a row whose conditioning contradicts the pass its position names (prompt_index -1); warned about",
}

#: pipelines whose denoiser calls attnprobe does not label, with when (a local of their ``__call__``; ``None``:
#: always) and why
REFUSED = {
    "LEditsPPPipelineStableDiffusion": (None, "adds a block of rows per editing prompt"),
    "LEditsPPPipelineStableDiffusionXL": (None, "adds a block of rows per editing prompt"),
    "SemanticStableDiffusionPipeline": ("enable_edit_guidance", "adds a block of rows per editing prompt"),
    "StableDiffusionParadigmsPipeline": (None, "batches several timesteps into one denoiser call"),
    "StableDiffusionSAGPipeline": ("do_self_attention_guidance", "runs extra denoiser calls on degraded latents"),
    "StableDiffusionAttendAndExcitePipeline": (None, "runs extra denoiser calls to take gradients of the attention"),
    "StableDiffusionPanoramaPipeline": (None, "runs one denoiser call per view of the panorama at every step"),
}

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
    if name in REFUSED:
        when, why = REFUSED[name]
        if when is None or loc.get(when):
            raise ProbeError(
                f"{name} {why}, which attnprobe does not label: it refuses rather than record rows or calls under "
                "wrong labels. Probe the pipeline it derives from (e.g. StableDiffusionPipeline) instead"
                + (f", or run without what sets {when}" if when else "")
            )


def blocks(pipe, guidance: bool, safety: bool = False) -> tuple[tuple[str, str], ...]:
    """The blocks of the pipeline call's denoiser batch in order, each ``(pass, text)`` where text is
    ``"prompt"``, ``"negative"`` (the negative prompt) or ``"safety"`` (SLD's safety concept).

    Args:
        pipe: the pipeline. guidance: classifier-free guidance runs in the batch.
        safety: Safe Latent Diffusion's safety-concept pass runs.
    """
    if type(pipe).__name__ in _PIX2PIX:  # torch.cat([prompt, negative, negative]) with [image, image, zeros]
        return (("cond", "prompt"), ("image", "negative"), ("uncond", "negative")) if guidance else (("cond", "prompt"),)
    out = (("uncond", "negative"), ("cond", "prompt")) if guidance else (("cond", "prompt"),)
    if safety:
        out += (("safety", "safety"),)
    if _perturbed(pipe):  # PAG: torch.cat([cond] * 2), after the unconditional block
        out += (("perturbed", "prompt"),)
    return out


def _perturbed(pipe) -> bool:
    try:
        return bool(pipe.do_perturbed_attention_guidance)
    except Exception:  # not a PAG pipeline, or its call has not set pag_scale yet
        return False
