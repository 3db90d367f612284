"""CLIP pre-training with caption noise, as one library call: config -> image-text pairs ->
caption noise by pair index -> grain stream of (image, tokens) -> the same train loop as
supervised pre-training (orbax, bitwise resume, preemption, multi-host), with the contrastive
objective (train/contrastive.py).

Pairs: the embedded sets (Fashion-MNIST or MNIST images with templated captions, one per pair
index) or real image-text records (TFDS coco_captions, or webdataset shards converted to
array_record; nmjax/data/image_text.py). Caption noise: noise.caption_permutation, exactly
round(r * N) pairs given another pair's caption, keyed by pair index.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from nmjax import models, noise, parallel
from nmjax.clip import tokenizer
from nmjax.config import check_choice, check_range, total_steps
from nmjax.data import image_text, pipeline, records, sources, webdataset
from nmjax.errors import ConfigError
from nmjax.models import clip as clip_models
from nmjax.train import contrastive, loop, state as state_lib
from nmjax.train.pretrain import check_run_fields, start_run

# OpenAI CLIP's image normalisation (fractions of 255), which open_clip's RN50 recipe uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ARRAY_RECORD = "array_record:"  # config.dataset prefix of a converted webdataset folder


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field before any work; raises ConfigError with one line."""
  check_choice(config, "model", tuple(clip_models.CLIP_MODELS))
  check_dataset(config.dataset)
  check_choice(config, "loss", contrastive.LOSSES)
  check_range(config, "caption_noise", low=0.0, high=1.0, high_inclusive=False)
  check_choice(config, "dtype", tuple(models.DTYPES))
  check_choice(config, "optimizer", ("adamw",))
  if not isinstance(config.quick_gelu, bool):
    raise ConfigError(f"config.quick_gelu={config.quick_gelu!r} must be True or False")
  for field in ("seed",):
    check_range(config, field, low=0, high=2**32 - 1, integer=True)
  for field in ("batch_size", "eval_batch_size", "log_every_steps", "checkpoint_every_steps",
                "max_to_keep", "context_length"):
    check_range(config, field, low=1, integer=True)
  check_range(config, "num_epochs", low=0, low_inclusive=False)
  check_range(config, "num_train_steps", integer=True)
  check_range(config, "learning_rate", low=0, low_inclusive=False)
  check_range(config, "weight_decay", low=0)
  check_range(config, "warmup_steps", low=0, integer=True)
  check_range(config, "adam_b1", low=0, high=1, high_inclusive=False)
  check_range(config, "adam_b2", low=0, high=1, high_inclusive=False)
  check_range(config, "adam_eps", low=0, low_inclusive=False)
  check_range(config, "crop_padding", low=0, integer=True)
  check_run_fields(config)


def source_info(config: ml_collections.ConfigDict,
                data_dir: str | None = None) -> sources.SourceInfo:
  """What an encoder of this run takes: the embedded image set's info, or for real pairs
  (JPEGs of any size) image_size x image_size RGB with CLIP's normalisation."""
  if is_embedded(config.dataset):
    return sources.get_source(config.dataset, data_dir=data_dir).info
  size = int(config.image_size)
  return sources.SourceInfo(
      name=config.dataset, num_classes=0, image_shape=(size, size, 3),
      mean=tuple(255 * m for m in CLIP_MEAN), std=tuple(255 * s for s in CLIP_STD),
      flip_ok=True, splits={}, class_names=())


def build_model(config: ml_collections.ConfigDict) -> clip_models.CLIP:
  """The config's CLIP (tower, QuickGELU, SigLIP bias, context length, compute dtype). On real
  (JPEG) pairs the image tower takes config.image_size RGB crops whatever its default input."""
  model = clip_models.get_clip_model(
      config.model, dtype=models.DTYPES[config.dtype], quick_gelu=bool(config.quick_gelu),
      siglip=config.loss == "sigmoid", context_length=int(config.context_length))
  if is_embedded(config.get("dataset", "")):
    return model
  vision = dataclasses.replace(model.vision, image_size=int(config.image_size), channels=3)
  return model.clone(vision=vision)


def is_embedded(dataset: str) -> bool:
  return dataset in image_text.EMBEDDED


def check_dataset(dataset: Any) -> None:
  """An embedded set, coco_captions, or array_record:DIR (webdataset shards converted once)."""
  if not isinstance(dataset, str) or not (
      is_embedded(dataset) or dataset == "coco_captions"
      or (dataset.startswith(ARRAY_RECORD) and len(dataset) > len(ARRAY_RECORD))):
    raise ConfigError(f"config.dataset={dataset!r} is unknown; allowed:"
                      f" {', '.join(image_text.EMBEDDED)}, coco_captions, {ARRAY_RECORD}DIR"
                      " (python -m nmjax.data.image_text convert --output DIR SHARDS...)")


def _real_pairs(config: ml_collections.ConfigDict, data_dir: str | None) -> Sequence[Any]:
  if config.dataset == "coco_captions":
    return image_text.coco_captions_pairs("train", seed=config.seed, data_dir=data_dir)
  folder = config.dataset[len(ARRAY_RECORD):]
  if not os.path.isabs(folder) and data_dir:
    folder = os.path.join(data_dir, folder)
  return webdataset.WebdatasetPairs(folder)


def split_pairs(config: ml_collections.ConfigDict) -> tuple[Sequence[Any], Sequence[Any]]:
  """(train, held-out) pairs, cut to max_train_examples / max_test_examples.

  Embedded sets use their train and test splits; real sets hold out their last
  config.held_out_pairs pairs (never trained on) for the loop's retrieval evaluation."""
  data_dir = config.data_dir or None
  if is_embedded(config.dataset):
    train, test = _embedded(config, "train"), _embedded(config, "test")
  else:
    pairs = _real_pairs(config, data_dir)
    held = min(int(config.held_out_pairs), len(pairs) // 2)
    train = records.SubsetRecords(pairs, range(len(pairs) - held))
    test = records.SubsetRecords(pairs, range(len(pairs) - held, len(pairs)))
  return (_prefix(train, config.max_train_examples), _prefix(test, config.max_test_examples))


def _embedded(config: ml_collections.ConfigDict, split: str) -> image_text.EmbeddedPairs:
  return image_text.embedded_pairs(config.dataset, split, seed=config.seed,
                                   data_dir=config.data_dir or None)


def _prefix(examples: Sequence, n: int) -> Sequence:
  return examples if n <= 0 or n >= len(examples) else records.SubsetRecords(examples, range(n))


def caption_tokens(pairs: image_text.EmbeddedPairs, context_length: int) -> np.ndarray:
  """int32 (N, context_length): pair i's own caption, tokenized (the few distinct captions of
  an embedded set are tokenized once and gathered)."""
  unique = tokenizer.tokenize(list(pairs.unique_captions), context_length=context_length)
  return unique[pairs.caption_ids()]


class PairBatches:
  """A train iterator of (image, tokens) batches over the supervised grain stream.

  The stream's "labels" are the caption source of each pair index (the pair whose caption it
  is given), so crops, flips, order, sharding and resume are exactly the supervised stream's;
  this wrapper swaps the source index for its caption tokens.
  """

  def __init__(self, inner: Any, tokens: np.ndarray):
    self._inner, self._tokens = inner, tokens

  def __iter__(self) -> "PairBatches":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._inner)
    return {"image": batch["image"], "tokens": self._tokens[batch["label"]],
            "caption_index": batch["label"], "label": batch["clean_label"],
            "index": batch["index"]}

  def get_state(self) -> dict[str, Any]:
    return self._inner.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._inner.set_state(state)


def real_batch(batch: dict[str, np.ndarray], *, pairs: Sequence[Any], image_size: int,
               context_length: int) -> dict[str, np.ndarray]:
  """A stream element ({id, uniforms}) -> decoded random-resized crops and caption tokens."""
  read = image_text.read_batch(pairs, batch["id"], batch["uniforms"], image_size=image_size)
  return {"image": read["image"],
          "tokens": tokenizer.tokenize(read["caption"], context_length=context_length),
          "caption_index": read.get("caption_source", read["index"]).astype(np.int32),
          "index": read["index"].astype(np.int32)}


def _real_eval(test: Sequence[Any], config: ml_collections.ConfigDict,
               process: dict[str, int]) -> Iterator[dict[str, np.ndarray]]:
  crops = records.MappedRecords(test, lambda pair: {
      "image": image_text.decode_image(pair, config.image_size), "label": 0,
      "index": pair["index"], "caption": pair["caption"]})
  for batch in pipeline.eval_batches(crops, batch_size=config.eval_batch_size,
                                     num_threads=max(1, config.data_workers), **process):
    yield batch


def caption_sources(num_pairs: int, ratio: float, seed: int) -> np.ndarray:
  """int64 (num_pairs,): the pair whose caption each pair trains with (exactly
  round(ratio * num_pairs) pairs get another pair's caption)."""
  return noise.caption_permutation(num_pairs, ratio, seed, field="config.caption_noise")


def _embedded_inputs(config: ml_collections.ConfigDict, train: Sequence[Any],
                     test: Sequence[Any], source: np.ndarray, num_steps: int,
                     process: dict[str, int]) -> tuple[Callable, Callable]:
  train_tokens = caption_tokens(_embedded(config, "train"), config.context_length)
  test_tokens = caption_tokens(_embedded(config, "test"), config.context_length)
  sources_of = np.arange(len(train_tokens), dtype=np.int64)
  sources_of[:len(source)] = source  # Pairs past max_train_examples are never read.
  flip = bool(config.flip and sources.get_source(config.dataset).info.flip_ok)

  def train_iterator(saved_state: dict | None) -> PairBatches:
    inner = pipeline.train_iterator(
        train, labels=sources_of, global_batch_size=config.batch_size, seed=config.seed,
        num_steps=num_steps, crop_padding=config.crop_padding, flip=flip,
        start_state=saved_state, **process)
    return PairBatches(inner, train_tokens)

  def eval_batches() -> Iterable:
    for batch in pipeline.eval_batches(test, batch_size=config.eval_batch_size, **process):
      yield {**batch, "tokens": test_tokens[batch["index"]]}

  return train_iterator, eval_batches


def _real_inputs(config: ml_collections.ConfigDict, train: Sequence[Any], test: Sequence[Any],
                 source: np.ndarray, num_steps: int,
                 process: dict[str, int]) -> tuple[Callable, Callable]:
  # Train pairs are the first len(train) positions of the whole set (split_pairs), so stream
  # ids address the whole set directly; its captions serve the held-out pairs too.
  pairs = _real_pairs(config, config.data_dir or None)
  whole_source = np.arange(len(pairs), dtype=np.int64)
  whole_source[:len(source)] = source
  noisy = image_text.NoisyCaptions(pairs, whole_source)
  load = functools.partial(real_batch, pairs=noisy, image_size=config.image_size,
                           context_length=config.context_length)
  fingerprint = {"pipeline": "image_text", "seed": int(config.seed),
                 "global_batch_size": int(config.batch_size), "num_examples": len(train),
                 "image_size": int(config.image_size)}

  def train_iterator(saved_state: dict | None) -> Any:
    stream = pipeline.train_stream(
        len(train), source, global_batch_size=config.batch_size, seed=config.seed,
        num_epochs=None, num_steps=num_steps, draws_per_example=image_text.DRAWS_PER_EXAMPLE,
        draws_after_repeat=True, **process)
    batches = pipeline.WorkerBatches(stream.map(load), num_workers=config.data_workers,
                                     num_threads=1)
    return pipeline.TrainIterator(batches, fingerprint, saved_state)

  def eval_batches() -> Iterable:
    for batch in _real_eval(test, config, process):
      captions = [pairs.caption(int(i)) if m else "" for i, m in zip(batch["index"],
                                                                    batch["mask"])]
      yield {**batch, "tokens": tokenizer.tokenize(captions,
                                                   context_length=config.context_length)}

  return train_iterator, eval_batches


def _loop_spec(config: ml_collections.ConfigDict, input_fns: tuple[Callable, Callable],
               steps_per_epoch: int, num_steps: int) -> loop.LoopSpec:
  model = build_model(config)
  schedule = state_lib.learning_rate_schedule(
      base_lr=config.learning_rate, warmup_steps=config.warmup_steps, total_steps=num_steps)
  tx = state_lib.make_optimizer(config, schedule)
  info = source_info(config, data_dir=config.data_dir or None)
  mean, std = info.mean, info.std

  def init_state() -> state_lib.TrainState:
    return state_lib.create_train_state(
        model, jax.random.key(config.seed), (1, *model.image_shape), tx,
        extra_inputs=(np.zeros((1, config.context_length), np.int32),))

  train_iterator, eval_batches = input_fns
  return loop.LoopSpec(
      init_state=init_state, train_iterator=train_iterator, eval_batches=eval_batches,
      steps_per_epoch=steps_per_epoch, total_steps=num_steps,
      objective=contrastive.objective(mean=mean, std=std, dtype=models.DTYPES[config.dtype],
                                      loss=config.loss),
      log_every_steps=config.log_every_steps,
      checkpoint_every_steps=config.checkpoint_every_steps, max_to_keep=config.max_to_keep,
      param_sharding=config.get("param_sharding", "replicated"),
      record_examples=bool(config.get("record_examples", False)),
      eval_every_epochs=config.get("eval_every_epochs", 1), name="pretrain_clip")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pre-trains (or resumes) a CLIP in `workdir`; returns the last epoch's record (train_loss,
  train_i2t_acc, train_t2i_acc, test_loss, test_i2t_acc, test_t2i_acc, ...)."""
  validate(config)
  mesh = start_run(config, workdir)
  train, test = split_pairs(config)
  source = caption_sources(len(train), config.caption_noise, config.seed)
  steps_per_epoch, num_steps = total_steps(
      num_examples=len(train), global_batch_size=config.batch_size,
      num_epochs=config.num_epochs, num_train_steps=config.num_train_steps)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  inputs = _embedded_inputs if is_embedded(config.dataset) else _real_inputs
  input_fns = inputs(config, train, test, source, num_steps, process)
  spec = _loop_spec(config, input_fns, steps_per_epoch, num_steps)
  wrong = int(np.sum(source != np.arange(len(source))))
  if parallel.is_main_process():
    print(f"[pretrain_clip] {config.model} on {config.dataset}: {len(train)} train /"
          f" {len(test)} test pairs, caption noise {config.caption_noise} ({wrong} of"
          f" {len(train)} captions from another pair), {num_steps} steps of batch"
          f" {config.batch_size} on {mesh.devices.size} device(s) in {jax.process_count()}"
          f" process(es), workdir {workdir}", flush=True)
  return loop.train_and_evaluate(spec, workdir, mesh=mesh)
