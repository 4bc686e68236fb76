"""The shapes model: a small Stable-Diffusion-layout pipeline trained offline on 32 × 32 scenes of coloured shapes whose
every pixel is known, so that heat maps can be scored against ground truth (docs/shapes-model.md).

- ``scenes``: the procedural scenes (``render``), their programmatic checker (``read_scene``) and heat-map scores.
- ``model``: the architecture, ``load`` (the shipped weights) and ``train``.
- ``evaluate``: caption following and localisation against the targets.
- ``python -m attnprobe.models.shapes train|evaluate``: both from the command line.
"""
