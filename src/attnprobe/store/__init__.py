"""The recorded maps and their coordinates: ``AttentionStore`` (in memory, a saved file, or a streamed folder).

    >>> from attnprobe.testing import synthetic_store
    >>> store = synthetic_store(calls=3, grid=(2, 4))
    >>> tuple(store[store.sites[0].name].shape)        # [call, sample, head, qh, qw, token]
    (3, 1, 2, 2, 4, 77)

- ``records``: ``Site``, ``Call``, ``Sample``: the coordinates of the ``site``, ``call`` and ``sample`` axes.
- ``attention_store``: ``AttentionStore`` (reading maps, token labels, text shares) and ``StoreWriter``, the only
  way a probe fills one.
- ``axes``: positions a user may pass to choose calls, samples and tokens, checked once.
- ``files``: the JSON header, ``save`` to one safetensors file, ``load`` from a file or a streamed folder.
- ``shards``: the streamed format, one safetensors shard per denoiser call, token-major.
- ``integrity``: what a file proves before it is read: checksums, the store's id, its header against its maps.
- ``export``: ``to_xarray`` and ``to_pandas``.

The store knows nothing of pipelines: the probe (``attnprobe.capture``) fills it through a ``StoreWriter``; analyses
(``attnprobe.analysis``) read it through its public methods.
"""

from .attention_store import AttentionStore, StoreWriter
from .files import FORMAT_VERSION
from .records import Call, Sample, Site

__all__ = ["AttentionStore", "StoreWriter", "Call", "Sample", "Site", "FORMAT_VERSION"]
