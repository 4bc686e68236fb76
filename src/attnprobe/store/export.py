"""A store as labelled tables: ``to_xarray`` (one site, named dimensions and coordinates) and ``to_pandas`` (a tidy
frame of every site's token masses). ``AttentionStore.to_xarray`` / ``to_pandas`` call these. They need the
``export`` extra (xarray, pandas), imported when called.
"""

from __future__ import annotations

__all__ = ["to_xarray", "to_pandas"]


def to_xarray(store, site=None):
    """One site's maps as a labelled ``xarray.DataArray`` (needs the ``xarray`` extra).

    Dims ``call sample head qh qw token`` (a video store: ``call sample head qt qh qw token``, ``qt`` the latent
    frames at the sites' resolution); coordinates: ``timestep`` and ``generation`` per call,
    ``pass_label``, ``prompt_index``, ``image_index`` and ``text`` per sample, ``token_string`` per
    ``(sample, token)``. Values are probabilities (sum to 1 over ``token``).

    Args:
        site: a site name or ``Site``. Default: the first site in execution order.

    Examples:
        >>> from attnprobe.testing import synthetic_store
        >>> da = to_xarray(synthetic_store(calls=3))
        >>> da.dims, round(float(da.sum("token").mean()), 6)
        (('call', 'sample', 'head', 'qh', 'qw', 'token'), 1.0)
    """
    import xarray as xr

    name = store.site_name(site if site is not None else store.sites[0])
    maps = store[name]
    index, timestep, generation = store.call_coordinates()
    return xr.DataArray(
        maps.float().numpy(),
        dims=("call", "sample", "head", *store.grid_dims, "token"),
        coords={
            "call": index,
            "timestep": ("call", timestep),
            "generation": ("call", generation),
            "sample": [s.index for s in store.samples],
            "pass_label": ("sample", [s.pass_label for s in store.samples]),
            "prompt_index": ("sample", [s.prompt_index for s in store.samples]),
            "image_index": ("sample", [s.image_index for s in store.samples]),
            "text": ("sample", [s.text or "" for s in store.samples]),
            "token": store.token_positions if store.token_positions is not None else list(range(maps.shape[-1])),
            "token_string": (("sample", "token"), [store.tokens(s.index) for s in store.samples]),
        },
        name=name,
        attrs={"site": name, "pipeline": str(store.meta.get("pipeline")), "denoiser": str(store.meta.get("denoiser"))},
    )


def to_pandas(store):
    """A tidy ``pandas.DataFrame``: one row per call, sample, site and token position, with the token's
    attention mass there (averaged over heads and image positions; sums to 1 over a sample's tokens).

    Columns: ``call timestep generation sample pass_label prompt_index image_index site token token_string
    mass`` (``token``: the position in the prompt). Needs ``pandas``.

    Examples:
        >>> from attnprobe.testing import synthetic_store
        >>> df = to_pandas(synthetic_store(calls=2))
        >>> len(df), round(float(df.groupby(["call", "site"]).mass.sum().iloc[0]), 6)
        (154, 1.0)
    """
    import numpy as np
    import pandas as pd

    frames = []
    for site in store.site_names:
        maps = store[site].float()  # [call, sample, head, qh, qw, token] (video: qt qh qw)
        mass = (maps.mean(dim=(2, 3, 4)) if maps.ndim == 6 else maps.flatten(2, -2).mean(2)).numpy()  # [call, sample, token]
        n_calls, n_samples, n_tokens = mass.shape
        call, sample, token = np.meshgrid(np.arange(n_calls), np.arange(n_samples), np.arange(n_tokens), indexing="ij")
        frames.append(pd.DataFrame({"call": call.ravel(), "sample": sample.ravel(), "site": site,
                                    "token": token.ravel(), "mass": mass.ravel()}))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["call", "sample", "site", "token", "mass"])
    index, timestep, generation = store.call_coordinates()
    calls = pd.DataFrame({"call": index, "timestep": timestep, "generation": generation})
    samples = pd.DataFrame([{"sample": s.index, "pass_label": s.pass_label, "prompt_index": s.prompt_index,
                             "image_index": s.image_index} for s in store.samples])
    strings = pd.DataFrame([{"sample": s.index, "token": t, "token_string": text}
                            for s in store.samples for t, text in enumerate(store.tokens(s.index))])
    df["call"] = df["call"].map(dict(enumerate(index)))
    df = df.merge(calls, on="call").merge(samples, on="sample").merge(strings, on=["sample", "token"])
    if store.token_positions is not None:  # the prompt position, as in to_xarray's token coordinate
        df["token"] = df["token"].map(dict(enumerate(store.token_positions)))
    return df[["call", "timestep", "generation", "sample", "pass_label", "prompt_index", "image_index", "site",
               "token", "token_string", "mass"]]
