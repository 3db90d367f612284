"""Data for nmjax: record adapters and the one batched read (records.py), the source registry of
embedded and TFDS datasets (sources.py, with embedded.py's loaders and fashion_mnist.py's TFDS
builder), the one grain training stream and eval batches (pipeline.py), the ImageNet JPEG input
(imagenet.py), corruptions (shifts.py) and host-side augmentations (transforms.py). Import the
submodules; this package imports nothing heavy on its own.
"""

__all__: list[str] = []  # No public names of its own: import the submodules.
