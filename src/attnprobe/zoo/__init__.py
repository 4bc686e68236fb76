"""Small models and data with ground truth, built and run offline (``attnprobe.zoo.shapes``: scenes of coloured
shapes with per-object masks, a programmatic checker of generated images, heat-map localisation scores)."""
