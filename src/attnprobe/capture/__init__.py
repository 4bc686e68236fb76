"""Capture: record a pipeline's cross-attention while it generates, without changing what it generates.

    >>> import attnprobe
    >>> from attnprobe.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with attnprobe.probe(pipe, heads="mean") as store:
    ...     _ = pipe("a picture of dog", num_inference_steps=2, height=64, width=64, output_type="latent")
    >>> len(store.calls), store.meta["family"]
    (2, 'unet')

One probed generation, in order:

1. ``probe()`` (``entry``; the ``Recorder`` of ``recorder`` does the work) finds the denoiser's family (``families``) and its sites (``sites``: attention modules
   of the family's site ``kinds``), wraps each site's processor (``kinds.wrap_processor``: ``cross.ProbeProcessor``
   or ``joint.JointProbeProcessor``) and hooks the denoiser and the text encoders whose positions are the text keys.
2. Each text-encoder call hands its token ids to ``rows.BatchRows``, and what the pipeline's ``encode_prompt``
   returns is kept (``evidence.EncodeWatch``).
3. Each denoiser call (``denoiser_call``): its timestep and latent grid are read; at a pipeline call's first
   denoiser call the batch rows are labelled (``rows``: pass from the pipeline's recipe, ``passes``; checked against
   each row's conditioning, ``evidence``; prompt, image, token layout) and the rows to record chosen; a later call
   whose batch or conditioning changed is labelled again; ``selection`` says which calls and token positions are
   kept. A video denoiser's call also gives its query grid ``(qt, qh, qw)`` (``frames``: latent frames over its
   temporal patch, rows and columns over its spatial patch), and its first call checks that the store will fit.
4. Inside the denoiser, each wrapper calls the installed processor unchanged, reads q and k from the module's own
   projections, and computes the map beside it in fp32 (``processor.reduce_probs``: token selection, head mean).
   At a site's first recorded call it also checks the processor's output against the map times the values
   (``cross.output_error``).
5. When the denoiser returns, each site's maps are laid on their grid (``[sample, head, qh, qw, token]``, a video
   denoiser's ``[sample, head, qt, qh, qw, token]``: ``frames.frame_maps``) and the call's maps go to ``sink.CallSink``, which writes them
   into the store through its ``StoreWriter`` (memory, a streamed folder) or adds them to a running aggregate.
6. On exit everything is removed (``finally``) and the store gets its execution order and metadata.

With ``probe(relations=...)``, ``relations`` keeps other blocks of the same attention beside the maps
(image->image at chosen points, text->image and text->text at joint sites).

Beside the probe, ``concepts`` carries ConceptAttention's concept tokens through a Flux or SD3 transformer's
double-stream blocks (``concept_stream``; the analysis entry point is ``attnprobe.concept_attention``).
"""

from .. import _moved
from .families import FAMILIES, Family, checked_family, family_of
from .entry import probe
from .sites import denoiser_of, list_sites, select_sites

__all__ = ["probe", "list_sites", "select_sites", "denoiser_of", "Family", "FAMILIES", "family_of", "checked_family"]

__getattr__ = _moved.package_getattr(__name__)  # call_filter and the sink, which lived here in 0.1.0
