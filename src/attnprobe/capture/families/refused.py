"""Denoisers attnprobe refuses by what they are, before the pipeline runs (``Family.refused`` says why): video and
other 3-D denoisers other than Wan 2.1, SkyReels-V2, CogVideoX, HunyuanVideo, LTX-Video, Allegro, Sana-Video, Mochi 1
and Kandinsky 5 (dense attention) text-to-video (each with what is missing to record it), audio denoisers (no image
grid), priors that denoise one CLIP image embedding (no image positions), Stable Cascade's decoder (no per-token text) and Qwen-Image 2.1 (a
block-causal sequence with a KV cache). Each names the diffusers 0.42 classes it covers; a class it does not name falls
to the generic family, which is refused too unless a probe is told to record it by structure.
"""

from .cascade import is_prior
from .registry import Family, first_text_encoder

def _video(name: str, title: str, denoisers: tuple[str, ...], why: str, **more) -> Family:
    """A video denoiser refused up front: ``why`` names what attnprobe lacks to record it exactly (it records the frame
    axis, ``[call, sample, head, qt, qh, qw, token]``, of Wan 2.1, SkyReels-V2, CogVideoX, HunyuanVideo, LTX-Video,
    Allegro, Sana-Video, Mochi 1 and Kandinsky 5, whose reading is checked against a reference)."""
    return Family(name=name, title=title, denoisers=denoisers, kinds=(), text_streams=first_text_encoder,
                  refused=why, **more)


#: Wan 2.1's and SkyReels-V2's image-to-video denoisers (the classes of ``wan.FAMILY`` and ``wan.SKYREELS_V2``, built
#: with ``image_dim``)
WAN_IMAGE = _video(
    "wan-image", "Wan 2.1 or SkyReels-V2 image-to-video (with image_dim)",
    ("WanTransformer3DModel", "SkyReelsV2Transformer3DModel"),
    "its attn2 also attends to the CLIP image tokens of the input image (add_k_proj), a second softmax whose output is "
    "added to the text's: two kernel calls per site, and image keys that are not text tokens",
    matches=lambda denoiser: denoiser.config.image_dim is not None or denoiser.config.added_kv_proj_dim is not None,
    pipelines=("WanImageToVideo", "SkyReelsV2ImageToVideo"))

#: HunyuanVideo's image-to-video denoiser (the class of ``hunyuanvideo.FAMILY``, built with ``image_condition_type``)
HUNYUANVIDEO_IMAGE = _video(
    "hunyuanvideo-image", "HunyuanVideo image-to-video (HunyuanVideoTransformer3DModel with image_condition_type)",
    ("HunyuanVideoTransformer3DModel",),
    "its text keys are a LLaVA encoder's hidden states that start with the input image's tokens (every "
    "image_embed_interleave-th of them), the prompt's cut around the assistant header row by row, and with "
    "image_condition_type='token_replace' its first latent frame is modulated apart: no labelling of those keys exists",
    matches=lambda denoiser: denoiser.config.image_condition_type is not None,
    pipelines=("HunyuanVideoImageToVideo",))

#: Kandinsky 5's sparse configuration (the class of ``kandinsky5.FAMILY`` built with ``attention_type`` other than
#: ``"regular"``)
KANDINSKY5_NABLA = _video(
    "kandinsky5-nabla", "Kandinsky 5 with sparse attention (Kandinsky5Transformer3DModel, attention_type='nabla')",
    ("Kandinsky5Transformer3DModel",),
    "its attention_type is not 'regular': its pipeline passes sparse_params (NABLA), which reorder the video tokens in "
    "8 × 8 blocks (to_fractal) and run the video self-attention in sparse blocks through flex attention, so its "
    "queries are not one (t, h, w) grid attnprobe can read. Kandinsky 5 with attention_type='regular' is recorded",
    matches=lambda denoiser: getattr(denoiser.config, "attention_type", "regular") != "regular",
    pipelines=())

VIDEO_FAMILIES = (
    WAN_IMAGE,
    HUNYUANVIDEO_IMAGE,
    _video("hunyuanvideo-framepack", "HunyuanVideo Framepack (HunyuanVideoFramepackTransformer3DModel)",
           ("HunyuanVideoFramepackTransformer3DModel",),
           "it denoises the video one section at a time, its video positions joined with clean history latents "
           "patchified at 1×, 2× and 4× (latents_clean, latents_history_2x/4x) and an image's SigLIP tokens, each "
           "at frame indices passed per call: its queries are not one qt × qh × qw grid of the latents it is called "
           "with"),
    _video("ltx2", "LTX-2 (LTX2VideoTransformer3DModel)", ("LTX2VideoTransformer3DModel",),
           "it denoises audio and video together (audio-to-video and video-to-audio cross-attention beside the text's) "
           "from packed latents: its audio stream and the audio-video cross-attention are not read (LTX-Video's "
           "LTXPipeline is recorded)"),
    KANDINSKY5_NABLA,
    _video("frames-in-batch", "a UNet that folds frames into the batch (UNet3DConditionModel: "
           "ModelScope text-to-video; I2VGenXLUNet; LatteTransformer3DModel)",
           ("UNet3DConditionModel", "I2VGenXLUNet", "LatteTransformer3DModel"),
           "its spatial cross-attention runs on batch × frame rows (each frame an image of its own, frames then mixed "
           "by temporal modules) in this denoiser's own layout of rows, frames and conditioning, which no family reads "
           "yet (AnimateDiff's UNetMotionModel, which folds frames the same way, is recorded: AnimateDiffPipeline)"),
    _video("video", "a video or other 3-D denoiser",
           ("AnyFlowTransformer3DModel", "AnyFlowFARTransformer3DModel", "ChronoEditTransformer3DModel",
            "ConsisIDTransformer3DModel", "CosmosTransformer3DModel", "EasyAnimateTransformer3DModel",
            "HeliosTransformer3DModel", "JoyImageEditTransformer3DModel", "JoyImageEditPlusTransformer3DModel",
            "Kandinsky6Transformer3DModel", "MotifVideoTransformer3DModel", "SanaWMTransformer3DModel",
            "UNetSpatioTemporalConditionModel", "WanAnimateTransformer3DModel", "WanVACETransformer3DModel"),
           "this denoiser's layout of frames, patches and text keys (extra conditioning streams, control hints, "
           "identity or image tokens, or no text at all) has no family that reads it; attnprobe records the frame "
           "axis of Wan 2.1 (WanPipeline), SkyReels-V2 (SkyReelsV2Pipeline), CogVideoX (CogVideoXPipeline), "
           "HunyuanVideo (HunyuanVideoPipeline), LTX-Video (LTXPipeline), "
           "Allegro (AllegroPipeline), Sana-Video (SanaVideoPipeline), Mochi 1 (MochiPipeline) and Kandinsky 5 "
           "(Kandinsky5T2VPipeline)"),
)
VIDEO = VIDEO_FAMILIES[-1]

AUDIO = Family(
    name="audio",
    title="an audio denoiser",
    denoisers=("AceStepTransformer1DModel", "AudioLDM2UNet2DConditionModel", "LongCatAudioDiTTransformer",
               "StableAudioDiTModel", "StableAudio3DiTModel"),
    kinds=(),
    text_streams=first_text_encoder,
    refused="its queries are positions in an audio latent, not an image grid",
)

PRIOR = Family(
    name="prior",
    title="a CLIP-embedding prior (PriorTransformer)",
    denoisers=("PriorTransformer",),
    kinds=(),
    text_streams=first_text_encoder,
    refused="it denoises one CLIP image embedding, so there are no image positions whose attention to the text "
            "could be recorded; probe the decoder pipeline that turns the embedding into an image",
)

CASCADE_DECODER = Family(
    name="cascade-decoder",
    title="Stable Cascade's decoder (StableCascadeUNet without clip_text_in_channels)",
    denoisers=("StableCascadeUNet",),
    kinds=(),
    text_streams=first_text_encoder,
    matches=lambda denoiser: not is_prior(denoiser),
    pipelines=("StableCascadeDecoder", "StableCascadeCombined"),
    refused="its attention blocks attend to the image and the pooled CLIP text embedding alone (clip_seq keys made "
            "from one vector), never to the prompt's tokens, so there is no token whose attention could be recorded. "
            "Probe the prior instead: StableCascadePriorPipeline (a StableCascadeCombinedPipeline's prior_pipe), "
            "whose prior attends to CLIP's token positions",
)

QWEN_IMAGE_21 = Family(
    name="qwen-image-2.1",
    title="Qwen-Image 2.1 (QwenImage21Transformer2DModel)",
    denoisers=("QwenImage21Transformer2DModel",),
    kinds=(),
    text_streams=first_text_encoder,
    refused="its text and image positions share one block-causal sequence (causal text, the latent slots placed "
            "among the vision-language positions), whose attention runs as one kernel call per segment of that "
            "sequence (or flex attention), and with the default KV cache every step after the first attends from the "
            "target image's queries to keys cached at the first: attnprobe reads one bidirectional kernel call over "
            "[text; image] per site and cannot tell these keys apart exactly",
)

FAMILIES = (*VIDEO_FAMILIES, AUDIO, PRIOR, CASCADE_DECODER, QWEN_IMAGE_21)
