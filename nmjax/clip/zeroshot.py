"""Zero-shot classification with a CLIP text tower: class names x prompt templates.

A class's weight is the mean of its prompts' L2-normalized text embeddings, normalized again (the
CLIP paper's prompt ensembling); an image is assigned the class whose weight has the largest
cosine with its L2-normalized image embedding. `IMAGENET_TEMPLATES` are the 80 prompts of the
CLIP paper's ImageNet evaluation; `SIMPLE_TEMPLATES` is the one-template mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nmjax.errors import ConfigError

SIMPLE_TEMPLATES = ("a photo of a {}.",)
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.", "art of the {}.",
    "a drawing of the {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "the plushie {}.", "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "a tattoo of the {}.",
)
DEFAULT_TEMPLATES = "imagenet"
TEMPLATE_SETS: Mapping[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES, "simple": SIMPLE_TEMPLATES}


def templates_named(name: str) -> tuple[str, ...]:
  """The prompt set `name` (imagenet: 80 prompts, simple: one)."""
  if name not in TEMPLATE_SETS:
    raise ConfigError(f"config.zeroshot_templates={name!r} is unknown; allowed:"
                      f" {', '.join(TEMPLATE_SETS)}")
  return TEMPLATE_SETS[name]


def readable(name: str) -> str:
  """A class name as a prompt says it: underscores to spaces ("ankle_boot" -> "ankle boot")."""
  return name.replace("_", " ").strip()


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_weights(embed_texts: Callable[[Sequence[str]], np.ndarray],
                  class_names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
  """(C, E) float32 unit rows: per class, the normalized mean of its prompts' unit embeddings.

  embed_texts(prompts) -> (len(prompts), E) text embeddings (unnormalized is fine).
  """
  if not class_names or not templates:
    raise ConfigError("zero-shot needs at least one class name and one prompt template")
  prompts = [t.format(readable(c)) for c in class_names for t in templates]
  embeddings = l2_normalize(embed_texts(prompts)).reshape(len(class_names), len(templates), -1)
  return l2_normalize(embeddings.mean(axis=1)).astype(np.float32)


def predict(image_features: np.ndarray, weights: np.ndarray,
            subset: Sequence[int] | None = None) -> np.ndarray:
  """Class indices (int64) by cosine with the class weights; `subset`: classes allowed (their
  indices into `weights`), for tasks that test on a subset of the classes."""
  logits = l2_normalize(image_features) @ np.asarray(weights, np.float64).T
  if subset is not None:
    allowed = np.asarray(subset, np.int64)
    return allowed[np.argmax(logits[:, allowed], axis=1)]
  return np.argmax(logits, axis=1).astype(np.int64)


def accuracy(image_features: np.ndarray, labels: np.ndarray, weights: np.ndarray,
             subset: Sequence[int] | None = None) -> dict[str, Any]:
  """{accuracy, num_test, correct (the per-example hits)} of zero-shot predictions."""
  labels = np.asarray(labels, np.int64)
  hits = predict(image_features, weights, subset) == labels
  return {"accuracy": float(np.mean(hits)) if len(labels) else float("nan"),
          "num_test": int(len(labels)), "correct": hits}
