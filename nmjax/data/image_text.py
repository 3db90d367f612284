"""Image-text pairs for contrastive (CLIP) pre-training: sources with an index per pair, caption
noise by index, and the per-record decode.

Every source is a random-access sequence (`__len__`, `__getitem__`, the batched
`__getitems__`; read with nmjax.data.records.read_many) whose record i is the pair with index i:

    {"image": uint8 (H, W, C) or encoded bytes, "caption": str, "index": int64,
     "label": int64 (embedded only), "key": str (webdataset only)}

and which reads captions alone with `caption(i)` / `captions(indices)`, so that caption noise
never reads the image of the pair whose caption it borrows.

  embedded_pairs(name, split, seed)  digits, mnist, fashion_mnist (nmjax.data.sources) with a
      caption templated over the class name: pair i gets template TEMPLATES[name][t] with
      t = template_choice(i, seed, 8), a hash of (seed, i) (the same pair, seed and split give
      the same caption on every host, in every worker, after every restart). CLASS_NAMES and
      TEMPLATES are public so zero-shot classifiers use the same words. Images are uint8
      (28, 28, 1), nothing to decode.
  coco_captions_pairs(split, seed)  TFDS coco_captions (Karpathy splits train/val/test/restval)
      where prepared as array_record; one pair per image, its caption chosen among the image's
      (about five) by template_choice(i, seed, count); index = record position. Read from the
      prepared folder without TFDS's builder code (which needs TensorFlow); never downloaded.
  webdataset.WebdatasetPairs(dir)  img2dataset tar shards converted once to array_record:
      python -m nmjax.data.image_text convert --output DIR SHARD [SHARD ...]

Caption noise: NoisyCaptions(pairs, noise.caption_permutation(len(pairs), ratio, seed)) gives
pair i the caption of pair source[i] (exactly round(ratio * N) wrong), keeping "clean_caption".
Decode: read_batch reads a batch of records and decodes encoded images to uint8 (S, S, 3): a
random-resized crop from the stream's uniforms (nmjax.data.imagenet's crop; open_clip's training
transform, area 0.9-1 and no flip, by default) or, without uniforms, the central crop.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from nmjax.data import fashion_mnist, imagenet, locations, records, sources, webdataset
from nmjax.data import webdataset_shards
from nmjax import errors
from nmjax.errors import ConfigError, DataError

Pair = dict[str, Any]

EMBEDDED = ("digits", "fashion_mnist", "mnist")
# The dataset's own label names (nmjax.data.fashion_mnist, as TFDS names them), so that a
# zero-shot classifier, which takes class names from the task, says what the captions said.
FASHION_MNIST_CLASS_NAMES = fashion_mnist.CLASS_NAMES
# Written out as words: a text tower reads "seven" in the captions it learns from; a glyph "7"
# would be one token shared with every other use of the numeral.
DIGIT_CLASS_NAMES = ("zero", "one", "two", "three", "four",
                     "five", "six", "seven", "eight", "nine")
FASHION_MNIST_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a small photo of a {}.",
    "a blurry photo of the {}.",
    "a close-up photo of a {}.",
    "a grayscale photo of a {}.",
    "a centered photo of the {}.",
)
DIGIT_TEMPLATES = (
    'a photo of the number: "{}".',
    "a photo of the digit {}.",
    "a handwritten {}.",
    "the number {} written by hand.",
    "a black and white image of the digit {}.",
    "a blurry photo of the number {}.",
    "a low resolution photo of the digit {}.",
    "a grayscale picture of the handwritten digit {}.",
)
CLASS_NAMES = {"digits": DIGIT_CLASS_NAMES, "mnist": DIGIT_CLASS_NAMES,
               "fashion_mnist": FASHION_MNIST_CLASS_NAMES}
TEMPLATES = {"digits": DIGIT_TEMPLATES, "mnist": DIGIT_TEMPLATES,
             "fashion_mnist": FASHION_MNIST_TEMPLATES}
COCO_SPLITS = ("train", "val", "test", "restval")
COCO_COMMAND = ("tfds build coco_captions --data_dir={tfds_dir} --file_format=array_record "
                "(on a machine with internet and TensorFlow), then copy "
                "{tfds_dir}/coco_captions here")
# open_clip's training crop: RandomResizedCrop(scale=(0.9, 1.0)) and no flip (captions may say
# "left" or hold text that a mirror image reverses).
CLIP_MIN_AREA = 0.9
DRAWS_PER_EXAMPLE = imagenet.DRAWS_PER_EXAMPLE
_CHOICE_TAG = 0x63617074  # "capt": caption choices never coincide with other uses of `seed`.
_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser on uint64 arrays (wrapping arithmetic): a well-mixed 64-bit hash."""
  with np.errstate(over="ignore"):
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def template_choice(indices: Any, seed: int, num_choices: Any) -> np.ndarray:
  """int64 choices in [0, num_choices): a pure function of (seed, index) for each index.

  indices: int or array of pair indices; num_choices: int or an array broadcast with them
  (coco's per-image caption counts). The same (seed, index) gives the same choice whatever the
  other indices, the dataset size or the process reading it.
  """
  indices = np.asarray(indices, dtype=np.int64)
  num_choices = np.asarray(num_choices, dtype=np.int64)
  if np.any(num_choices < 1):
    raise ValueError(f"num_choices must be >= 1, got {num_choices.min()}")
  key = _splitmix64(np.asarray((int(seed) ^ _CHOICE_TAG) & _MASK64, dtype=np.uint64))
  with np.errstate(over="ignore"):
    hashed = _splitmix64(indices.astype(np.uint64) + key)
  return (hashed % num_choices.astype(np.uint64)).astype(np.int64)


def _check_seed(seed: Any) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError(f"seed={seed!r} must be an integer >= 0")
  return int(seed)


class EmbeddedPairs(Sequence):
  """Pairs of in-memory images and templated captions (see the module docstring).

  Record i: {"image": images[i], "caption": str, "label": int64, "index": int64}. Captions are
  unique_captions[caption_ids()[i]], with caption id label * len(templates) + template: a text
  tower can tokenize the few distinct captions once and gather by id.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
               templates: Sequence[str], seed: int):
    self.images = images
    self.labels = np.asarray(labels, dtype=np.int64)
    self.class_names = tuple(class_names)
    self.templates = tuple(templates)
    self.seed = _check_seed(seed)
    self.unique_captions = tuple(t.format(c) for c in self.class_names for t in self.templates)
    self._ids = self.labels * len(self.templates) + template_choice(
        np.arange(len(self.labels)), self.seed, len(self.templates))
    self._ids.flags.writeable = False

  def __len__(self) -> int:
    return len(self.labels)

  def caption_ids(self) -> np.ndarray:
    """int64 (N,): pair i's caption is unique_captions[caption_ids()[i]] (read-only)."""
    return self._ids

  def caption(self, i: int) -> str:
    return self.unique_captions[self._ids[int(i)]]

  def captions(self, indices: Iterable[int]) -> list[str]:
    return [self.unique_captions[self._ids[int(i)]] for i in indices]

  def __getitem__(self, i: int) -> Pair:
    if not 0 <= i < len(self):
      raise IndexError(i)
    i = int(i)
    return {"image": self.images[i], "caption": self.caption(i),
            "label": np.int64(self.labels[i]), "index": np.int64(i)}

  def __getitems__(self, indices: Sequence[int]) -> list[Pair]:
    return [self[int(i)] for i in indices]


def embedded_pairs(name: str, split: str, *, seed: int,
                   data_dir: str | os.PathLike | None = None) -> EmbeddedPairs:
  """The embedded dataset `name` (digits, mnist, fashion_mnist) as templated image-text pairs.

  Images, labels and the index come from nmjax.data.sources.get_source(name) (the same split
  rule and index); captions use CLASS_NAMES[name] and TEMPLATES[name], chosen by (seed, index).
  """
  if name not in EMBEDDED:
    raise ConfigError(f"config.dataset={name!r} has no templated captions; allowed: "
                      f"{', '.join(EMBEDDED)}")
  images, labels, _ = sources.get_source(name, data_dir=data_dir).load_arrays(split)
  return EmbeddedPairs(images, labels, CLASS_NAMES[name], TEMPLATES[name], seed)


class CocoPairs(Sequence):
  """coco_captions images (JPEG bytes) each paired with one of its captions (module docstring).

  Record i: {"image": JPEG bytes, "caption": str, "index": int64}, i the record position.
  """

  def __init__(self, data_source: Sequence[Mapping[str, Any]], seed: int):
    self._data_source = data_source
    self.seed = _check_seed(seed)

  def __len__(self) -> int:
    return len(self._data_source)

  def _caption(self, record: Mapping[str, Any], i: int) -> str:
    texts = list(record["captions"]["text"])
    if not texts:
      raise DataError(f"coco_captions record {i} has no caption")
    text = texts[int(template_choice(i, self.seed, len(texts)))]
    return text.decode() if isinstance(text, bytes) else str(text)

  def _pair(self, record: Mapping[str, Any], i: int) -> Pair:
    return {"image": record["image"], "caption": self._caption(record, i), "index": np.int64(i)}

  def __getitem__(self, i: int) -> Pair:
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self._pair(self._data_source[int(i)], int(i))

  def __getitems__(self, indices: Sequence[int]) -> list[Pair]:
    indices = [int(i) for i in indices]
    return [self._pair(r, i) for r, i in zip(records.read_many(self._data_source, indices),
                                             indices)]

  def caption(self, i: int) -> str:
    return self[int(i)]["caption"]

  def captions(self, indices: Iterable[int]) -> list[str]:
    return [p["caption"] for p in self.__getitems__(list(indices))]


def coco_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The newest prepared coco_captions/2014/<version> folder under <data_dir>/tfds, checked.

  Raises DataError naming the TFDS command that prepares it; nothing is downloaded. Under a
  data_dir in a bucket, that folder is copied to local disk once per host and the copy returned.
  """
  tfds_dir = locations.under(locations.data_root(data_dir), "tfds")
  command = COCO_COMMAND.format(tfds_dir=tfds_dir)
  config_dir = locations.under(tfds_dir, "coco_captions", "2014")
  missing = DataError(f"TFDS dataset 'coco_captions' is not prepared in {tfds_dir} (no "
                      f"{config_dir}/<version>/dataset_info.json); prepare it: {command}")
  if isinstance(config_dir, str):  # In a bucket.
    newest = locations.newest_version(config_dir)
    if newest is None:
      raise missing
    return pathlib.Path(locations.mirror(newest, what="TFDS dataset 'coco_captions'"))
  prepared = [p for p in config_dir.glob("*.*.*") if (p / "dataset_info.json").is_file()]
  if not prepared:
    raise missing
  return max(prepared, key=lambda p: tuple(int(v) for v in p.name.split(".")
                                           if v.isdigit()))


def coco_captions_pairs(split: str = "train", *, seed: int,
                        data_dir: str | os.PathLike | None = None) -> CocoPairs:
  """TFDS coco_captions, where prepared as array_record, as pairs (see the module docstring)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  folder = coco_dir(data_dir)
  builder = tfds.builder_from_directory(os.fspath(folder))
  if tfds.core.FileFormat.ARRAY_RECORD not in builder.info.available_file_formats():
    raise DataError(
        f"TFDS dataset 'coco_captions' in {folder} is stored as "
        f"{builder.info.file_format.value}, which has no random access; fix: tfds "
        f"convert_format --dataset_version_dir={folder} --out_file_format=array_record")
  if split not in builder.info.splits:
    raise ConfigError(f"split={split!r} is not a split of coco_captions; splits: "
                      f"{', '.join(builder.info.splits)}")
  features = builder.info.features
  if "image" not in features or "captions" not in features:
    raise DataError(f"{folder} has no 'image' and 'captions' features: not coco_captions")
  source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return CocoPairs(source, seed)


class NoisyCaptions(Sequence):
  """Pairs whose caption i is the caption of pair source[i] (noise.caption_permutation).

  Records gain "clean_caption" (the pair's own) and "caption_source" (int64 source[i]).
  """

  def __init__(self, pairs: Sequence[Pair], source: np.ndarray):
    source = np.asarray(source, dtype=np.int64)
    if source.shape != (len(pairs),) or (len(source) and (
        source.min() < 0 or source.max() >= len(pairs))):
      raise ValueError(f"source has shape {source.shape} or values outside 0..{len(pairs) - 1}; "
                       f"expected noise.caption_permutation({len(pairs)}, ratio, seed)")
    self._pairs = pairs
    self.source = source

  def __len__(self) -> int:
    return len(self._pairs)

  def _noisy(self, pair: Pair, caption: str) -> Pair:
    index = int(pair["index"])
    return {**pair, "caption": caption, "clean_caption": pair["caption"],
            "caption_source": np.int64(self.source[index])}

  def __getitem__(self, i: int) -> Pair:
    pair = self._pairs[i]
    return self._noisy(pair, self._pairs.caption(self.source[int(pair["index"])]))

  def __getitems__(self, indices: Sequence[int]) -> list[Pair]:
    pairs = records.read_many(self._pairs, indices)
    borrowed = self._pairs.captions(self.source[int(p["index"])] for p in pairs)
    return [self._noisy(p, c) for p, c in zip(pairs, borrowed)]

  def caption(self, i: int) -> str:
    return self._pairs.caption(self.source[int(i)])

  def captions(self, indices: Iterable[int]) -> list[str]:
    return self._pairs.captions(self.source[int(i)] for i in indices)


def decode_image(pair: Mapping[str, Any], image_size: int, uniforms: np.ndarray | None = None,
                 *, min_area: float = CLIP_MIN_AREA, flip: bool = False) -> np.ndarray:
  """An encoded pair image -> uint8 (image_size, image_size, 3).

  With uniforms (DRAWS_PER_EXAMPLE values from the stream): imagenet.random_resized_crop (area
  min_area..1, aspect 3/4..4/3, mirrored if flip); without: imagenet.center_crop. Raises
  DataError naming the pair's index (and key) for an image that cannot be decoded.
  """
  try:
    image = imagenet.decode(pair["image"])
  except (OSError, ValueError) as e:
    key = f" (key {pair['key']})" if "key" in pair else ""
    raise DataError(f"pair {int(pair['index'])}{key} holds an image that cannot be decoded "
                    f"({type(e).__name__}: {e})") from None
  if uniforms is None:
    return imagenet.center_crop(image, image_size)
  return imagenet.random_resized_crop(image, uniforms, image_size, min_area=min_area, flip=flip)


def read_batch(pairs: Sequence[Pair], ids: Sequence[int], uniforms: np.ndarray | None = None, *,
               image_size: int | None = None, min_area: float = CLIP_MIN_AREA,
               flip: bool = False) -> dict[str, Any]:
  """Reads pairs[ids] (one batched read) into one batch.

  Encoded images are decoded with decode_image (image_size required; uniforms (b,
  DRAWS_PER_EXAMPLE) for random crops, None for central crops); uint8 images (embedded) are
  stacked as they are. Returns {"image": uint8 (b, H, W, C), "caption": list[str] (tokenized
  downstream), "index": int64 (b,)}, plus "label", "clean_caption" and "caption_source" where
  the records hold them.
  """
  examples = records.read_many(pairs, ids)
  if examples and isinstance(examples[0]["image"], (bytes, np.bytes_)):
    if image_size is None:
      raise ConfigError("image_size must be set to decode encoded (JPEG) pair images")
    images = np.stack([decode_image(e, image_size, None if uniforms is None else uniforms[k],
                                    min_area=min_area, flip=flip)
                       for k, e in enumerate(examples)])
  else:
    images = np.stack([e["image"] for e in examples])
  batch = {"image": images, "caption": [e["caption"] for e in examples],
           "index": np.fromiter((e["index"] for e in examples), np.int64, len(examples))}
  for key, kind in (("label", np.int64), ("caption_source", np.int64)):
    if examples and key in examples[0]:
      batch[key] = np.fromiter((e[key] for e in examples), kind, len(examples))
  if examples and "clean_caption" in examples[0]:
    batch["clean_caption"] = [e["clean_caption"] for e in examples]
  return batch


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m nmjax.data.image_text",
      description="Image-text data for nmjax's CLIP pre-training.")
  commands = parser.add_subparsers(dest="command", required=True)
  convert = commands.add_parser(
      "convert", help="convert webdataset tar shards (img2dataset) into array_record, once")
  convert.add_argument("--output", required=True,
                       help="folder to create, local or gs://... (must not hold data)")
  convert.add_argument("shards", nargs="+",
                       help="tar files or globs, local or gs://..., e.g. 'shards/*.tar'")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  """The command line: `convert --output DIR SHARD...`; bad input exits 2 with one line."""
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  with errors.one_line_errors():
    manifest = webdataset.convert(args.shards, args.output)
    skipped = webdataset_shards.skipped_words(manifest["skipped"])
    print(f"converted {manifest['count']:,} pairs from {len(manifest['shards'])} shards into "
          f"{args.output}{'; ' + skipped if skipped else ''}", flush=True)


if __name__ == "__main__":
  main()
