"""A frozen encoder restored from a pre-training workdir, and its features per dataset split,
extracted once and kept as features files.

The weights are restored from the workdir's orbax checkpoints onto the current mesh (replicated)
from the checkpoint's own metadata, so a checkpoint saved on any number of devices loads here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nmjax import features as features_lib
from nmjax import models, parallel, tasks as tasks_lib
from nmjax.data import pipeline, records as records_lib, sources
from nmjax.data.transforms import EvalTransform
from nmjax.errors import ConfigError, DataError
from nmjax.train import checkpoint
from nmjax.train.steps import normalize


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A frozen pre-trained model. encode(variables, uint8 images) -> (n, D) pooled features."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict   # the pre-training config (config.json)
  info: sources.SourceInfo            # the pre-training dataset (input shape, normalisation)
  variables: Any                      # {"params", "batch_stats"}, replicated on the mesh
  encode: Callable[[Any, jax.Array], jax.Array]
  feature_dim: int
  digest: str                         # content_digest(config, variables)
  # A CLIP's text tower: encode_text(variables, int32 tokens (n, T)) -> (n, E); None otherwise.
  encode_text: Callable[[Any, jax.Array], jax.Array] | None = None
  context_length: int = 0             # A CLIP's token positions.
  transform: EvalTransform = EvalTransform()  # How task images of other sizes become its input.

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.info.image_shape)

  @property
  def identity(self) -> str:
    """The key of this encoder's cached features: its content digest, not its path, so a
    workdir trained again (even at the same path and step) never reuses old features."""
    return self.digest

  def describe(self) -> str:
    """'resnet_small from DIR (step N; pre-trained on D with symmetric noise r)'."""
    pre = self.config
    noise = (f"caption noise {pre.caption_noise}" if "caption_noise" in pre else
             f"{pre.get('noise_type', 'symmetric')} noise {pre.get('noise_ratio')}")
    return (f"{pre.model} from {self.workdir} (step {self.step}; pre-trained on {pre.dataset}"
            f" with {noise})")


def content_digest(config: ml_collections.ConfigDict, variables: Any) -> str:
  """Short sha256 of what the features depend on: the model, compute dtype and input
  normalisation (the pre-training dataset) named in `config`, an imported model's layout options
  and evaluation transform, and the bytes of every weight."""
  named = [config.get("model"), config.get("dtype", "float32"), config.get("dataset")]
  for field in ("model_options", "input"):  # Imported encoders' only (nmjax.convert).
    if config.get(field) is not None:
      named.append(config[field].to_dict() if hasattr(config[field], "to_dict")
                   else config[field])
  digest = hashlib.sha256(json.dumps(named, sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    # Replicated arrays: every shard, the first addressable one included, is the whole array.
    array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()[:16]


def _checkpoint_steps(workdir: str) -> list[int]:
  """The committed steps of a pre-training workdir; fails with one line when it is none."""
  if not workdir:
    raise ConfigError("config.checkpoint is empty; pass --config.checkpoint=PRETRAIN_WORKDIR")
  if os.path.isfile(workdir):
    raise ConfigError(f"config.checkpoint={workdir} is a file, not a pre-training workdir; pass"
                      " the folder a pre-training run wrote (its config.json and checkpoints/)")
  if not os.path.isdir(workdir):
    raise ConfigError(f"config.checkpoint={workdir} does not exist; pass a pre-training workdir")
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    raise DataError(f"config.checkpoint={workdir} has no config.json: not a pre-training workdir"
                    " (main.py --config configs/pretrain.py --workdir DIR writes one)")
  checkpoints = checkpoint.directory(workdir)
  steps = checkpoint.saved_steps(workdir)  # Named steps; load_state checks the one it uses.
  if not steps:
    raise DataError(f"config.checkpoint={workdir} has no checkpoint (nothing committed under"
                    f" {checkpoints}); finish or resume the pre-training run first")
  return steps


def model_input(config: ml_collections.ConfigDict, data_dir: str | None = None
                ) -> tuple[sources.SourceInfo, EvalTransform]:
  """What an encoder takes in: classes, input shape and normalisation (as a SourceInfo), and
  the evaluation transform. An imported encoder's config.json carries them in its `input`
  section (mean and std in 0..1 units, as timm writes them); a pre-trained one takes them from
  its pre-training dataset, evaluated with the default transform."""
  given = config.get("input")
  if given is None:
    return sources.get_source(config.dataset, data_dir=data_dir).info, EvalTransform()
  size = int(given.image_size)
  info = sources.SourceInfo(
      name=str(config.get("dataset")), num_classes=int(config.num_classes),
      image_shape=(size, size, len(given.mean)), mean=tuple(255.0 * m for m in given.mean),
      std=tuple(255.0 * s for s in given.std), flip_ok=True, splits={}, class_names=())
  return info, EvalTransform.from_config(given)


def load(workdir: str, *, step: int = -1, mesh: jax.sharding.Mesh | None = None,
         data_dir: str | None = None) -> Encoder:
  """Restores the encoder of a pre-training workdir (step -1: its latest checkpoint)."""
  workdir = os.path.abspath(workdir) if workdir else workdir
  steps = _checkpoint_steps(workdir)
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      config = ml_collections.ConfigDict(json.load(f))
  except (ValueError, TypeError, AttributeError) as e:  # Torn, or JSON but not an object.
    raise DataError(f"config.checkpoint={workdir}: {path} cannot be read ({type(e).__name__});"
                    " it is torn or not a pre-training config, so nothing says what the"
                    " checkpoints are of; put that run's config.json back") from None
  if step >= 0 and step not in steps:
    raise ConfigError(f"config.step={step} is not a checkpoint of {workdir}; saved steps:"
                      f" {', '.join(map(str, sorted(steps)))}")
  mesh = mesh or parallel.make_mesh()
  # The newest usable step (damaged newer ones skipped with a warning), or the one asked for,
  # refused with its folder named when it cannot be used.
  step, state = checkpoint.load_state(workdir, step=step if step >= 0 else None,
                                      sharding=parallel.replicated(mesh))
  variables = {k: state[k] for k in ("params", "batch_stats")}

  data_dir = data_dir or config.get("data_dir") or None
  # A CLIP workdir: pre-trained here (pretrain_clip) or imported (configs/import.py).
  if config.get("job") == "pretrain_clip" or config.get("model") in models.CLIP_MODELS:
    return _clip_encoder(workdir, int(step), config, variables, data_dir)
  info, transform = model_input(config, data_dir)
  dtype = models.DTYPES[config.get("dtype", "float32")]
  options = config.get("model_options")
  model = models.get_model(config.model, num_classes=info.num_classes, dtype=dtype,
                           **(options.to_dict() if options else {}))
  mean, std = tuple(info.mean), tuple(info.std)

  def encode(variables: Any, images: jax.Array) -> jax.Array:
    _, pooled = model.apply(variables, normalize(images, mean, std, dtype), train=False)
    return pooled.astype(jnp.float32)

  return Encoder(workdir=workdir, step=int(step), config=config, info=info, variables=variables,
                 encode=encode, feature_dim=model.feature_dim,
                 digest=content_digest(config, variables), transform=transform)


def _clip_encoder(workdir: str, step: int, config: ml_collections.ConfigDict, variables: Any,
                  data_dir: str | None) -> Encoder:
  """A CLIP workdir's encoder: features are the image tower's unnormalized embedding (what
  the reference's probe uses); the text tower comes along for zero-shot."""
  from nmjax.models.clip import CLIP  # pylint: disable=g-import-not-at-top
  from nmjax.train import pretrain_clip  # pylint: disable=g-import-not-at-top
  model = pretrain_clip.build_model(config)
  info = pretrain_clip.source_info(config, data_dir=data_dir)
  mean, std, dtype = tuple(info.mean), tuple(info.std), model.dtype

  def encode(variables: Any, images: jax.Array) -> jax.Array:
    return model.apply(variables, normalize(images, mean, std, dtype), train=False,
                       method=CLIP.encode_image)

  def encode_text(variables: Any, tokens: jax.Array) -> jax.Array:
    return model.apply(variables, tokens, method=CLIP.encode_text)

  return Encoder(workdir=workdir, step=step, config=config, info=info, variables=variables,
                 encode=encode, feature_dim=model.feature_dim,
                 digest=content_digest(config, variables), encode_text=encode_text,
                 context_length=int(config.context_length),
                 # An imported CLIP's own transform (CLIP's: crop 1.0, bicubic); else the default.
                 transform=EvalTransform.from_config(config.get("input")))


def evenly_spaced(records: Sequence[Any], limit: int) -> Sequence[Any]:
  """At most `limit` records spread evenly over the split (every class of a sorted set shows)."""
  if limit <= 0 or len(records) <= limit:
    return records
  positions = np.linspace(0, len(records) - 1, limit).round().astype(np.int64)
  return records_lib.SubsetRecords(records, positions)


class FeatureCache:
  """Features of dataset splits for one encoder, extracted on demand and kept as features files
  under WORKDIR/features/<encoder identity>/step_<N>/<split key>.npz."""

  def __init__(self, encoder: Encoder, workdir: str, *, batch_size: int, max_examples: int,
               data_dir: str | None, mesh: jax.sharding.Mesh):
    self.encoder = encoder
    self.root = os.path.join(workdir, "features", f"{encoder.identity}", f"step_{encoder.step}")
    self.batch_size = batch_size
    self.max_examples = max_examples
    self.data_dir = data_dir
    self.mesh = mesh
    self.extracted = 0  # Splits encoded (not read from the cache) by this process.

  @functools.lru_cache(maxsize=None)
  def info(self, dataset: str) -> sources.SourceInfo:
    return sources.get_source(dataset, data_dir=self.data_dir).info

  def path(self, split: tasks_lib.Split, suffix: str = "") -> str:
    limit = f"-max{self.max_examples}" if self.max_examples > 0 else ""
    return os.path.join(self.root, f"{split.key}{limit}{suffix}.npz")

  def records(self, split: tasks_lib.Split) -> Sequence[Any]:
    """The split's examples at the encoder's input shape, capped at max_examples."""
    records, _ = tasks_lib.split_records(split, image_shape=self.encoder.image_shape,
                                         data_dir=self.data_dir,
                                         transform=self.encoder.transform)
    return evenly_spaced(records, self.max_examples)

  def get(self, split: tasks_lib.Split) -> features_lib.FeatureSet:
    path = self.path(split)
    num_classes = self.info(split.dataset).num_classes
    if os.path.exists(path):
      try:
        return features_lib.load(path, num_classes=num_classes,
                                 feature_dim=self.encoder.feature_dim)
      except DataError as e:
        print(f"[features] ignoring a bad cached features file ({e}); extracting again",
              flush=True)
    batches = pipeline.eval_batches(self.records(split), batch_size=self.batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    values, labels = features_lib.extract(self.encoder.encode, self.encoder.variables, batches,
                                          mesh=self.mesh)
    self.extracted += 1
    if jax.process_index() == 0:
      features_lib.save(path, values, labels, domain=str(split), extra={
          "checkpoint": self.encoder.workdir, "step": self.encoder.step})
    return features_lib.FeatureSet(values, labels, domain=str(split), path=path)

  def test_set(self, task: tasks_lib.Task) -> tuple[features_lib.FeatureSet, np.ndarray | None]:
    """The task's test splits' features, concatenated, with labels in the train set's classes;
    and the train class of each test class for a logit-subset task (tasks.label_map)."""
    parts = [self.get(s) for s in task.test]
    labels = np.concatenate([p.labels for p in parts])
    label_map = tasks_lib.label_map(self.info(task.train.dataset),
                                    self.info(task.test[0].dataset), task)
    if label_map is not None:
      labels = label_map[labels]
    test_set = features_lib.FeatureSet(np.concatenate([p.features for p in parts]), labels,
                                       domain="+".join(str(s) for s in task.test))
    return test_set, label_map
