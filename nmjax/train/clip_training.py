"""CLIP pre-training with caption noise, as one library call: a plan -> image-text pairs ->
caption noise by pair index -> grain stream of (image, tokens) -> the same train loop as
supervised pre-training (orbax, bitwise resume, preemption, multi-host), with the contrastive
objective (train/contrastive.py). The pretrain_clip job (nmjax/jobs/pretrain_clip.py, which
checks the plan) runs it.

Pairs: the embedded sets (Fashion-MNIST or MNIST images with templated captions, one per pair
index) or real image-text records (TFDS coco_captions, or webdataset shards converted to
array_record; nmjax/data/image_text.py). Caption noise: noise.caption_permutation, exactly
round(r * N) pairs given another pair's caption, keyed by pair index.

A pair whose image cannot be decoded (a truncated file, a header claiming more pixels than
Pillow's decompression-bomb limit) stops the run with DataError naming its index and key
(decode_named): the same pair comes at the same point of every rerun, and skipping it would
change the batches that a resume reproduces bitwise. The conversion skips such images; a folder
converted without that check is converted again.

A run's fields come from a plan: any object with the attributes of the pretrain_clip job's
ClipPlan (nmjax/jobs/pretrain_clip.py), read as they are; nothing here checks them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from nmjax import io as nmjax_io, models, noise, parallel
from nmjax.clip import tokenizer
from nmjax.config import total_steps
from nmjax.data import image_text, jpeg, pipeline, records, sources, webdataset
from nmjax.errors import DataError, NmjaxError
from nmjax.models import clip_model as clip_models
from nmjax.train import contrastive, loop, profiling, state as state_lib
from nmjax.train.supervised import prefix, start_run

# OpenAI CLIP's image normalisation (fractions of 255), which open_clip's RN50 recipe uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ARRAY_RECORD = "array_record:"  # dataset prefix of a converted webdataset folder


def source_info(fields: Any, data_dir: str | None = None) -> sources.SourceInfo:
  """What an encoder of this run takes: the embedded image set's info, or for real pairs
  (JPEGs of any size) image_size x image_size RGB with CLIP's normalisation.

  Args:
    fields: the run's plan, or the record of its workdir's config.json as a ConfigDict (read:
      dataset, and image_size for real pairs).
    data_dir: where the embedded sets are (None: the default).
  """
  if is_embedded(fields.dataset):
    return sources.get_source(fields.dataset, data_dir=data_dir).info
  size = int(fields.image_size)
  return sources.SourceInfo(
      name=fields.dataset, num_classes=0, image_shape=(size, size, 3),
      mean=tuple(255 * m for m in CLIP_MEAN), std=tuple(255 * s for s in CLIP_STD),
      flip_ok=True, splits={}, class_names=())


def build_model(fields: Any) -> clip_models.CLIP:
  """The run's CLIP (tower, QuickGELU, SigLIP bias, context length, compute dtype). On real
  (JPEG) pairs the image tower takes image_size RGB crops whatever its default input.

  Args:
    fields: the run's plan, or the record of its workdir's config.json as a ConfigDict (read:
      model, dtype, quick_gelu, loss, context_length, dataset, and image_size for real pairs).
  """
  model = clip_models.get_clip_model(
      fields.model, dtype=models.DTYPES[fields.dtype], quick_gelu=bool(fields.quick_gelu),
      siglip=fields.loss == "sigmoid", context_length=int(fields.context_length))
  if is_embedded(fields.dataset):
    return model
  vision = dataclasses.replace(model.vision, image_size=int(fields.image_size), channels=3)
  return model.clone(vision=vision)


def is_embedded(dataset: str) -> bool:
  return dataset in image_text.EMBEDDED


def _real_pairs(plan: Any, data_dir: str | None) -> Sequence[Any]:
  if plan.dataset == "coco_captions":
    return image_text.coco_captions_pairs("train", seed=plan.seed, data_dir=data_dir)
  folder = plan.dataset[len(ARRAY_RECORD):]
  if not os.path.isabs(folder) and not nmjax_io.is_cloud(folder) and data_dir:
    folder = nmjax_io.join(data_dir, folder)
  return webdataset.WebdatasetPairs(folder)


def split_pairs(plan: Any) -> tuple[Sequence[Any], Sequence[Any]]:
  """(train, held-out) pairs, cut to max_train_examples / max_test_examples.

  Embedded sets use their train and test splits; real sets hold out their last
  plan.held_out_pairs pairs (never trained on) for the loop's retrieval evaluation."""
  data_dir = plan.data_dir or None
  if is_embedded(plan.dataset):
    train, test = _embedded(plan, "train"), _embedded(plan, "test")
  else:
    pairs = _real_pairs(plan, data_dir)
    held = min(int(plan.held_out_pairs), len(pairs) // 2)
    train = records.SubsetRecords(pairs, range(len(pairs) - held))
    test = records.SubsetRecords(pairs, range(len(pairs) - held, len(pairs)))
  return prefix(train, plan.max_train_examples), prefix(test, plan.max_test_examples)


def _embedded(plan: Any, split: str) -> image_text.EmbeddedPairs:
  return image_text.embedded_pairs(plan.dataset, split, seed=plan.seed,
                                   data_dir=plan.data_dir or None)


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


def decode_fix(dataset: str) -> str:
  """What to do about a pair whose image cannot be decoded, for the message that names it."""
  if dataset == "coco_captions":
    return "fix: prepare coco_captions again (its stored record is damaged)"
  return ("fix: convert the shards again into a new folder (the conversion skips an image that"
          " does not decode) and train on that")


def decode_named(pair: Any, image_size: int, uniforms: np.ndarray | None = None, *,
                 fix: str = "") -> np.ndarray:
  """image_text.decode_image(pair, image_size, uniforms), or DataError naming the pair (index
  and key) whose image fails to decode (a truncated file, a header claiming too many pixels):
  training stops there, as the same pair comes at the same point of every rerun."""
  try:
    return image_text.decode_image(pair, image_size, uniforms)
  except jpeg.DECODE_ERRORS as e:
    if isinstance(e, NmjaxError):
      raise
    key = f" (key {pair['key']})" if "key" in pair else ""
    raise DataError(f"pair {int(pair['index'])}{key} holds an image that cannot be decoded"
                    f" ({type(e).__name__}: {e}); {fix or decode_fix('')}") from None


def real_batch(batch: dict[str, np.ndarray], *, pairs: Sequence[Any], image_size: int,
               context_length: int, fix: str = "") -> dict[str, np.ndarray]:
  """A stream element ({id, uniforms}) -> decoded random-resized crops and caption tokens.
  A pair whose image cannot be decoded is named (decode_named)."""
  try:
    read = image_text.read_batch(pairs, batch["id"], batch["uniforms"], image_size=image_size)
  except jpeg.DECODE_ERRORS as e:
    if not isinstance(e, NmjaxError):  # Find the pair (decoded alone, it fails the same way).
      for i, uniforms in zip(batch["id"], batch["uniforms"]):
        decode_named(pairs[int(i)], image_size, uniforms, fix=fix)
    raise
  return {"image": read["image"],
          "tokens": tokenizer.tokenize(read["caption"], context_length=context_length),
          "caption_index": read.get("caption_source", read["index"]).astype(np.int32),
          "index": read["index"].astype(np.int32)}


def _real_eval(test: Sequence[Any], plan: Any,
               process: dict[str, int]) -> Iterator[dict[str, np.ndarray]]:
  fix = decode_fix(plan.dataset)
  crops = records.MappedRecords(test, lambda pair: {
      "image": decode_named(pair, plan.image_size, fix=fix), "label": 0,
      "index": pair["index"], "caption": pair["caption"]})
  for batch in pipeline.eval_batches(crops, batch_size=plan.eval_batch_size,
                                     num_threads=max(1, plan.data_workers), **process):
    yield batch


def caption_sources(num_pairs: int, ratio: float, seed: int) -> np.ndarray:
  """int64 (num_pairs,): the pair whose caption each pair trains with (exactly
  round(ratio * num_pairs) pairs get another pair's caption)."""
  return noise.caption_permutation(num_pairs, ratio, seed, field="config.caption_noise")


def _embedded_inputs(plan: Any, train: Sequence[Any],
                     test: Sequence[Any], source: np.ndarray, num_steps: int,
                     process: dict[str, int]) -> tuple[Callable, Callable]:
  train_tokens = caption_tokens(_embedded(plan, "train"), plan.context_length)
  test_tokens = caption_tokens(_embedded(plan, "test"), plan.context_length)
  sources_of = np.arange(len(train_tokens), dtype=np.int64)
  sources_of[:len(source)] = source  # Pairs past max_train_examples are never read.
  flip = bool(plan.flip and sources.get_source(plan.dataset).info.flip_ok)

  def train_iterator(saved_state: dict | None) -> PairBatches:
    inner = pipeline.train_iterator(
        train, labels=sources_of, global_batch_size=plan.batch_size, seed=plan.seed,
        num_steps=num_steps, crop_padding=plan.crop_padding, flip=flip,
        start_state=saved_state, **process)
    return PairBatches(inner, train_tokens)

  def eval_batches() -> Iterable:
    for batch in pipeline.eval_batches(test, batch_size=plan.eval_batch_size, **process):
      yield {**batch, "tokens": test_tokens[batch["index"]]}

  return train_iterator, eval_batches


def _real_inputs(plan: Any, train: Sequence[Any], test: Sequence[Any],
                 source: np.ndarray, num_steps: int,
                 process: dict[str, int]) -> tuple[Callable, Callable]:
  # Train pairs are the first len(train) positions of the whole set (split_pairs), so stream
  # ids address the whole set directly; its captions serve the held-out pairs too.
  pairs = _real_pairs(plan, plan.data_dir or None)
  whole_source = np.arange(len(pairs), dtype=np.int64)
  whole_source[:len(source)] = source
  noisy = image_text.NoisyCaptions(pairs, whole_source)
  load = functools.partial(real_batch, pairs=noisy, image_size=plan.image_size,
                           context_length=plan.context_length, fix=decode_fix(plan.dataset))
  fingerprint = {"pipeline": "image_text", "seed": int(plan.seed),
                 "global_batch_size": int(plan.batch_size), "num_examples": len(train),
                 "image_size": int(plan.image_size)}

  def train_iterator(saved_state: dict | None) -> Any:
    stream = pipeline.train_stream(
        len(train), source, global_batch_size=plan.batch_size, seed=plan.seed,
        num_epochs=None, num_steps=num_steps, draws_per_example=image_text.DRAWS_PER_EXAMPLE,
        draws_after_repeat=True, **process)
    batches = pipeline.WorkerBatches(stream.map(load), num_workers=plan.data_workers,
                                     num_threads=1)
    return pipeline.TrainIterator(batches, fingerprint, saved_state)

  def eval_batches() -> Iterable:
    for batch in _real_eval(test, plan, process):
      captions = [pairs.caption(int(i)) if m else "" for i, m in zip(batch["index"],
                                                                    batch["mask"])]
      yield {**batch, "tokens": tokenizer.tokenize(captions,
                                                   context_length=plan.context_length)}

  return train_iterator, eval_batches


def _loop_spec(plan: Any, input_fns: tuple[Callable, Callable],
               steps_per_epoch: int, num_steps: int) -> loop.LoopSpec:
  model = build_model(plan)
  schedule = state_lib.learning_rate_schedule(
      base_lr=plan.learning_rate, warmup_steps=plan.warmup_steps, total_steps=num_steps)
  tx = state_lib.make_optimizer(state_lib.OptimizerSpec(
      optimizer=plan.optimizer, weight_decay=plan.weight_decay, adam_b1=plan.adam_b1,
      adam_b2=plan.adam_b2, adam_eps=plan.adam_eps), schedule)
  info = source_info(plan, data_dir=plan.data_dir or None)
  mean, std = info.mean, info.std

  def init_state() -> state_lib.TrainState:
    return state_lib.create_train_state(
        model, jax.random.key(plan.seed), (1, *model.image_shape), tx,
        extra_inputs=(np.zeros((1, plan.context_length), np.int32),))

  train_iterator, eval_batches = input_fns
  return loop.LoopSpec(
      init_state=init_state, train_iterator=train_iterator, eval_batches=eval_batches,
      steps_per_epoch=steps_per_epoch, total_steps=num_steps,
      objective=contrastive.objective(mean=mean, std=std, dtype=models.DTYPES[plan.dtype],
                                      loss=plan.loss),
      log_every_steps=plan.log_every_steps,
      checkpoint_every_steps=plan.checkpoint_every_steps, max_to_keep=plan.max_to_keep,
      param_sharding=plan.param_sharding, record_examples=bool(plan.record_examples),
      eval_every_epochs=plan.eval_every_epochs, name="pretrain_clip",
      profile_steps=profiling.profile_window(plan.profile_steps))


def run(plan: Any, workdir: str) -> dict[str, Any]:
  """Pre-trains (or resumes) a CLIP in `workdir`, an existing writable directory.

  Args:
    plan: the run's fields (a checked ClipPlan of the pretrain_clip job, or an object with its
      attributes).
    workdir: where checkpoints, metrics and config.json go.
  Returns:
    The last epoch's record (train_loss, train_i2t_acc, train_t2i_acc, test_loss, test_i2t_acc,
    test_t2i_acc, ...), with preempted=True when a SIGTERM stopped the run after saving.
  """
  mesh = start_run(plan, workdir)
  train, test = split_pairs(plan)
  source = caption_sources(len(train), plan.caption_noise, plan.seed)
  steps_per_epoch, num_steps = total_steps(
      num_examples=len(train), global_batch_size=plan.batch_size,
      num_epochs=plan.num_epochs, num_train_steps=plan.num_train_steps)
  process = dict(process_index=jax.process_index(), process_count=jax.process_count())
  inputs = _embedded_inputs if is_embedded(plan.dataset) else _real_inputs
  input_fns = inputs(plan, train, test, source, num_steps, process)
  spec = _loop_spec(plan, input_fns, steps_per_epoch, num_steps)
  wrong = int(np.sum(source != np.arange(len(source))))
  if parallel.is_main_process():
    print(f"[pretrain_clip] {plan.model} on {plan.dataset}: {len(train)} train /"
          f" {len(test)} test pairs, caption noise {plan.caption_noise} ({wrong} of"
          f" {len(train)} captions from another pair), {num_steps} steps of batch"
          f" {plan.batch_size} on {mesh.devices.size} device(s) in {jax.process_count()}"
          f" process(es), workdir {workdir}", flush=True)
  return loop.train_and_evaluate(spec, workdir, mesh=mesh)
