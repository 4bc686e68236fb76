"""AnimateDiff text-to-video (``AnimateDiffPipeline``, denoiser ``UNetMotionModel``): SD 1.5's UNet with motion modules.
Its spatial cross-attention (``attn2`` of the SD 1.5 transformer blocks) runs on ``batch × frame`` rows: the UNet
folds the frames of its ``[batch, channel, frame, h, w]`` latents into the batch, row ``b · frames + f`` for sample
``b`` and frame ``f`` (``sample.permute(0, 2, 1, 3, 4).reshape(batch · frames, ...)``), and the pipeline repeats each
latent row's prompt embeddings once per frame in the same order (``prompt_embeds.repeat_interleave(num_frames)``).
The probe reads each latent row's conditioning from the first of its frames' rows (``capture.batch_frames``), records
the ``(row, frame)`` rows of the samples it keeps and regroups them into the frame axis: ``[call, sample, head, qt,
qh, qw, token]`` with ``qt`` the frames (patch ``(1, 1, 1)``; the VAE decodes each frame alone: no temporal
compression). The motion modules' temporal attention (``motion_modules.*.attn1``/``attn2``, self-attention over the
frames) are not sites. Guidance batches ``[uncond, cond]`` as SD 1.5's.

Refused (``pipe_refused``): every other pipeline on ``UNetMotionModel`` (video-to-video, ControlNet, SparseCtrl,
SDXL, PAG, PIA: input frames or control hints not read), and FreeNoise (``enable_free_noise``: the UNet is called on
windows of the frames, so a call's frames are not the video's).
"""

from .registry import Family, first_text_encoder, unet_order

#: the pipeline classes recorded (names; a subclass is not assumed to call the UNet the same way)
PIPELINES = ("AnimateDiffPipeline",)
#: the pipelines of diffusers 0.42 on ``UNetMotionModel`` that ``pipe_refused`` refuses, with why (the coverage table)
_WHY = "inputs the probe does not read"
_HOW = {"AnimateDiffControlNetPipeline": "ControlNet hints added to the UNet's features",
        "AnimateDiffPAGPipeline": "perturbed-attention guidance (a third batch block whose self-attention is replaced)",
        "AnimateDiffSDXLPipeline": "SDXL's two text encoders and added conditioning, untested",
        "AnimateDiffSparseControlNetPipeline": "SparseCtrl hints on some frames",
        "AnimateDiffVideoToVideoControlNetPipeline": "an input video's latents and ControlNet hints",
        "AnimateDiffVideoToVideoPipeline": "an input video's latents (strength)",
        "PIAPipeline": "an input image's latents in extra channels"}
REFUSED_PIPELINES = {name: f"{name} runs UNetMotionModel with {how}; attnprobe records AnimateDiffPipeline"
                     for name, how in _HOW.items()}


def _frames(denoiser, sample):
    """Frames of ``[batch, channel, frame, h, w]`` latents; each frame is one image of the UNet: patch ``(1, 1, 1)``."""
    return int(sample.shape[2]), (1, 1, 1)


def _refused(pipe):
    name = type(pipe).__name__
    if name not in PIPELINES:
        return REFUSED_PIPELINES.get(name, f"{name} runs UNetMotionModel with {_WHY}; attnprobe records "
                                                 f"{', '.join(PIPELINES)} (text-to-video) on that denoiser")
    if getattr(pipe, "free_noise_enabled", False):
        return ("FreeNoise is enabled (enable_free_noise): the UNet is called on windows of the frames, so a denoiser "
                "call's frames are not the video's. Call pipe.disable_free_noise() to probe it")
    return None


FAMILY = Family(
    name="animatediff",
    title="AnimateDiff (UNetMotionModel)",
    denoisers=("UNetMotionModel",),
    kinds=("cross",),
    text_streams=first_text_encoder,
    order=unet_order,
    video=_frames,
    pipe_refused=_refused,
    matches=lambda denoiser: True,  # with pipelines: the coverage table's AnimateDiff pipelines are this family's
    pipelines=("AnimateDiff", "PIA"),
    frames_in_batch=True,
)
