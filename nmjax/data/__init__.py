"""Data for nmjax: sources (sources.py: the registry of embedded and TFDS datasets, with
fashion_mnist.py's TFDS builder), grain pipelines (pipeline.py) and host-side augmentations
(transforms.py). Import the submodules; this package imports nothing heavy on its own.
"""
