"""Synthetic datasets written by the tests and benchmarks themselves (never a download).

`NmjaxTinyTestDataset` is a tiny TFDS image classification dataset (registered with TFDS on
import, so sources.get_source finds it by name once written); `write_imagenet` writes a TFDS
dataset in the imagenet2012 format of photo-like random JPEGs (`synthetic_jpeg`);
`write_coco_captions`, `write_tar` and `webdataset_members` write image-text data in the layouts
nmjax.data.image_text reads (TFDS coco_captions, img2dataset webdataset shards).
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


class NmjaxTinyTestDataset(tfds.core.GeneratorBasedBuilder):
  """A 3-class dataset of 4x4 RGB images (train 20, test 7), read through the generic TFDS path."""

  VERSION = tfds.core.Version("0.1.0")
  SIZES = {"train": 20, "test": 7}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(4, 4, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in self.SIZES.items()}

  def _generate_examples(self, split, n):
    for i in range(n):
      value = (i * 10 + (split == "test")) % 256
      yield i, {"image": np.full((4, 4, 3), value, np.uint8), "label": i % 3}


def write_tiny(data_dir: str | os.PathLike) -> None:
  """Writes NmjaxTinyTestDataset as array_record under <data_dir>/tfds."""
  builder = NmjaxTinyTestDataset(data_dir=os.fspath(pathlib.Path(data_dir) / "tfds"),
                                 file_format="array_record")
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
  """A random but photo-like JPEG: smooth colour fields, mid-scale blobs, fine texture, noise.

  Pure noise compresses far worse and flat colour far better than photographs; this mix gives
  JPEG sizes in the range of ImageNet's (roughly 50-200 KB at 500x375).
  """
  def field(cells_x: int, cells_y: int, scale: float) -> np.ndarray:
    coarse = rng.uniform(-scale, scale, (cells_y, cells_x, 3)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(coarse[..., c], mode="F").resize(
        (width, height), Image.Resampling.BICUBIC)) for c in range(3)]
    return np.stack(channels, axis=-1)
  pixels = (rng.uniform(60, 190, 3).astype(np.float32) + field(4, 3, 70.0)
            + field(24, 18, 35.0) + field(width // 4, height // 4, 30.0)
            + rng.normal(0, 10, (height, width, 3)).astype(np.float32))
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
      buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def write_imagenet(data_dir: str | os.PathLike, *, splits: Mapping[str, int],
                   sizes: Sequence[tuple[int, int]] = ((500, 375), (375, 500), (500, 333)),
                   num_classes: int = 1000, seed: int = 0, name: str = "imagenet2012",
                   version: str = "5.1.0") -> pathlib.Path:
  """Writes a TFDS dataset with imagenet2012's features under <data_dir>/tfds; returns its dir.

  Features: image Image(JPEG), label ClassLabel(num_classes), file_name Text, as TFDS's own
  imagenet2012; array_record files, so imagenet.jpeg_records and sources.get_source read it like
  the real one. splits maps split name -> number of images (sizes cycle through `sizes`, labels are
  drawn uniformly; a split named "test" gets label -1 as in imagenet2012). Nothing is downloaded.
  """
  def examples(split: str, count: int) -> Iterator[tuple[str, dict[str, Any]]]:
    rng = np.random.default_rng([seed, sorted(splits).index(split)])
    for i in range(count):
      width, height = sizes[i % len(sizes)]
      label = -1 if split == "test" else int(rng.integers(num_classes))
      file_name = f"synthetic_{split}_{i:06d}.JPEG"
      yield file_name, {"image": synthetic_jpeg(rng, width, height), "label": label,
                        "file_name": file_name}

  with tfds.core.registered.skip_registration():
    class SyntheticImagenet(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version(version)

      def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Synthetic JPEGs in the imagenet2012 format.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=num_classes),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"))

      def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        return {split: self._generate_examples(split, count) for split, count in splits.items()}

      def _generate_examples(self, split: str, count: int
                             ) -> Iterator[tuple[str, dict[str, Any]]]:
        return examples(split, count)

    SyntheticImagenet.name = name
    tfds_dir = pathlib.Path(data_dir) / "tfds"
    builder = SyntheticImagenet(data_dir=os.fspath(tfds_dir), file_format="array_record")
    tfds.disable_progress_bar()  # A few dozen images: the bars are only noise in test logs.
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return pathlib.Path(builder.data_dir)


def write_coco_captions(data_dir: str | os.PathLike, *, splits: Mapping[str, int],
                        size: tuple[int, int] = (40, 30), seed: int = 0) -> pathlib.Path:
  """Writes a TFDS dataset laid out as coco_captions/2014 (1.1.0) under <data_dir>/tfds.

  Only the features nmjax reads: image (JPEG), image/filename, image/id and captions (a Sequence
  of {"text", "id"}); image i of a split has 1 + i % 5 captions "split s image i caption k".
  array_record files, so nmjax.data.image_text.coco_captions_pairs reads it like the real one.
  Returns the dataset's version folder. Nothing is downloaded.
  """
  def examples(split: str, count: int) -> Iterator[tuple[str, dict[str, Any]]]:
    rng = np.random.default_rng([seed, sorted(splits).index(split)])
    for i in range(count):
      captions = [{"text": f"{split} image {i} caption {k}", "id": 100 * i + k}
                  for k in range(1 + i % 5)]
      yield f"{split}_{i}", {"image": synthetic_jpeg(rng, *size), "image/filename": f"{i}.jpg",
                             "image/id": i, "captions": captions}

  with tfds.core.registered.skip_registration():
    class SyntheticCocoCaptions(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version("1.1.0")
      BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

      def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description="Synthetic JPEGs with captions, laid out as coco_captions.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "image/filename": tfds.features.Text(),
                "image/id": np.int64,
                "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
            }))

      def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        del dl_manager
        return {split: self._generate_examples(split, count) for split, count in splits.items()}

      def _generate_examples(self, split: str, count: int
                             ) -> Iterator[tuple[str, dict[str, Any]]]:
        return examples(split, count)

    SyntheticCocoCaptions.name = "coco_captions"
    builder = SyntheticCocoCaptions(data_dir=os.fspath(pathlib.Path(data_dir) / "tfds"),
                                    file_format="array_record")
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return pathlib.Path(builder.data_dir)


def write_tar(path: str | os.PathLike, members: Sequence[tuple[str, bytes]]) -> pathlib.Path:
  """Writes an uncompressed tar of (name, content) members in the given order (a webdataset
  shard as img2dataset writes them: KEY.jpg, KEY.txt, KEY.json per sample)."""
  import tarfile  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  with tarfile.open(path, "w") as tar:
    for name, content in members:
      info = tarfile.TarInfo(name)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))
  return path


def webdataset_members(keys: Sequence[str], captions: Sequence[str], *, seed: int = 0,
                       size: tuple[int, int] = (24, 16)) -> list[tuple[str, bytes]]:
  """img2dataset-style members for each (key, caption): KEY.jpg (a synthetic JPEG), KEY.txt
  (the caption, UTF-8) and KEY.json (metadata nmjax ignores)."""
  import json  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  members = []
  for key, caption in zip(keys, captions):
    members += [(f"{key}.jpg", synthetic_jpeg(rng, *size)), (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())]
  return members


def write_shards(folder: str | os.PathLike, captions: Sequence[str],
                 sizes: Sequence[int] = (5, 3)) -> list[pathlib.Path]:
  """Webdataset shards FOLDER/00000.tar, 00001.tar, ... of `sizes` samples each, keys
  SSSSSIIII, captions taken in order from `captions`, images seeded by the shard index."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths, start = [], 0
  for s, size in enumerate(sizes):
    keys = [f"{s:05d}{i:04d}" for i in range(size)]
    members = webdataset_members(keys, captions[start:start + size], seed=s)
    paths.append(write_tar(folder / f"{s:05d}.tar", members))
    start += size
  return paths
