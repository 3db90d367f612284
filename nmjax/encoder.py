"""A frozen encoder restored from a pre-training workdir (or a Hugging Face text model folder), and
its features per dataset split, extracted once and kept as features files beside its checkpoints
(the feature cache). A text encoder (nmjax.text_features) reads text tasks' splits
(nmjax.data.text_sources) and tokenizes them; an image encoder reads images.

The weights are restored from the workdir's orbax checkpoints onto the current mesh (replicated)
from the checkpoint's own metadata, so a checkpoint saved on any number of devices loads here.
What the encoder is comes from the workdir's config.json, read as the record of the job that
wrote it (its "job" field: pretrain, pretrain_clip or import). The feature cache is keyed by the
encoder's content (its digest), so transfer, NMTune and a study's stages over one encoder
extract each split once between them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nmjax import features as features_lib
from nmjax import io as nmjax_io
from nmjax import models, parallel, tasks as tasks_lib, text_features
from nmjax.data import pipeline, records as records_lib, sources, text_sources
from nmjax.data.transforms import EvalTransform
from nmjax.errors import ConfigError, DataError
from nmjax.train import checkpoint
from nmjax.train.steps import normalize


# What wrote a checkpoint's config.json (its "job" field): the record's fields follow from it.
PRETRAINING_JOBS = ("pretrain", "pretrain_clip", "import")


@dataclasses.dataclass(frozen=True)
class Pretraining:
  """What an encoder is, read from its workdir's config.json (the record of the job that wrote
  it: a pre-training run, a CLIP pre-training run, or an imported checkpoint)."""
  job: str                   # PRETRAINING_JOBS
  model: str
  dataset: str               # what it was pre-trained on
  dtype: str                 # compute dtype
  noise_type: str            # symmetric | pairflip | caption (a CLIP's: pairs with another caption)
  noise_ratio: float | None  # None: not recorded (an import that did not say)
  clip: bool                 # two towers: image features, and a text tower for zero-shot
  # An imported encoder's layout options and evaluation input (nmjax.convert); None otherwise.
  model_options: dict[str, Any] | None = None
  input: dict[str, Any] | None = None

  def noise(self) -> str:
    """'caption noise 0.1', 'symmetric noise 0.2'."""
    return f"{self.noise_type} noise {self.noise_ratio}"


def _field(record: Mapping[str, Any], name: str, where: str) -> Any:
  if name not in record:
    raise DataError(f"{where} has no field {name!r} (a {record['job']} record needs it); put that"
                    " run's config.json back")
  return record[name]


def pretraining(record: Mapping[str, Any], where: str = "config.json") -> Pretraining:
  """The Pretraining a checkpoint's config.json records, by the job that wrote it."""
  job = record["job"] if isinstance(record, Mapping) and "job" in record else None
  if job not in PRETRAINING_JOBS:
    raise DataError(f"{where} records job {job!r}, not a pre-training job"
                    f" ({', '.join(PRETRAINING_JOBS)}); it is not a pre-training workdir")
  field = functools.partial(_field, record, where=where)
  model, dataset, dtype = field("model"), field("dataset"), field("dtype")
  if job == "pretrain_clip":  # r is the fraction of pairs with another pair's caption.
    return Pretraining(job, model, dataset, dtype, "caption", field("caption_noise"), True)
  if job == "pretrain":
    return Pretraining(job, model, dataset, dtype, field("noise_type"), field("noise_ratio"),
                       False)
  return Pretraining(job, model, dataset, dtype, field("noise_type"), field("noise_ratio"),
                     model in models.CLIP_MODELS, dict(field("model_options")),
                     dict(field("input")))


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A frozen pre-trained model. encode(variables, uint8 images) -> (n, D) pooled features; a
  text encoder's encode takes text_features.INPUTS (token ids and masks) instead."""
  workdir: str
  step: int
  pretraining: Pretraining            # what it is (from config.json)
  info: sources.SourceInfo | None     # the pre-training dataset (input shape, normalisation)
  variables: Any                      # {"params", "batch_stats"}, replicated on the mesh
  encode: Callable[[Any, jax.Array], jax.Array]
  feature_dim: int
  digest: str                         # content_digest(pretraining, variables)
  # A CLIP's text tower: encode_text(variables, int32 tokens (n, T)) -> (n, E); None otherwise.
  encode_text: Callable[[Any, jax.Array], jax.Array] | None = None
  context_length: int = 0             # A CLIP's token positions.
  transform: EvalTransform = EvalTransform()  # How task images of other sizes become its input.
  # A text encoder's model and tokenizer, and the tokens it reads per example; None for images.
  text: text_features.TextModel | None = None
  max_length: int = 0

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
    pre = self.pretraining
    return (f"{pre.model} from {self.workdir} (step {self.step}; pre-trained on {pre.dataset}"
            f" with {pre.noise()})")


def content_digest(pre: Pretraining, variables: Any) -> str:
  """Short sha256 of what the features depend on: the model, compute dtype and input
  normalisation (the pre-training dataset), an imported model's layout options and evaluation
  input, and the bytes of every weight."""
  named = [pre.model, pre.dtype, pre.dataset]
  if pre.job == "import":
    named += [pre.model_options, pre.input]
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
  if nmjax_io.isfile(workdir):
    raise ConfigError(f"config.checkpoint={workdir} is a file, not a pre-training workdir; pass"
                      " the folder a pre-training run wrote (its config.json and checkpoints/)")
  if not nmjax_io.isdir(workdir):
    raise ConfigError(f"config.checkpoint={workdir} does not exist; pass a pre-training workdir")
  if not nmjax_io.isfile(nmjax_io.join(workdir, "config.json")):
    raise DataError(f"config.checkpoint={workdir} has no config.json: not a pre-training workdir"
                    " (main.py --config configs/pretrain.py --workdir DIR writes one)")
  checkpoints = checkpoint.directory(workdir)
  steps = checkpoint.saved_steps(workdir)  # Named steps; load_state checks the one it uses.
  if not steps:
    raise DataError(f"config.checkpoint={workdir} has no checkpoint (nothing committed under"
                    f" {checkpoints}); finish or resume the pre-training run first")
  return steps


def model_input(pre: Pretraining, record: Mapping[str, Any], data_dir: str | None = None
                ) -> tuple[sources.SourceInfo, EvalTransform]:
  """What a (not CLIP) encoder takes in: classes, input shape and normalisation (as a
  SourceInfo), and the evaluation transform. An imported encoder's config.json carries them in
  its `input` section (mean and std in 0..1 units, as timm writes them); a pre-trained one takes
  them from its pre-training dataset, evaluated with the default transform."""
  if pre.job != "import":
    return sources.get_source(pre.dataset, data_dir=data_dir).info, EvalTransform()
  given = pre.input
  size = int(given["image_size"])
  info = sources.SourceInfo(
      name=str(pre.dataset), num_classes=int(record["num_classes"]),
      image_shape=(size, size, len(given["mean"])), mean=tuple(255.0 * m for m in given["mean"]),
      std=tuple(255.0 * s for s in given["std"]), flip_ok=True, splits={}, class_names=())
  return info, EvalTransform.from_config(given)


def read_record(workdir: str) -> dict[str, Any]:
  """The workdir's config.json (the record of the job that wrote the checkpoints)."""
  path = nmjax_io.join(workdir, "config.json")
  try:
    record = json.loads(nmjax_io.read_text(path))
    if not isinstance(record, dict):
      raise TypeError("not a JSON object")
  except (ValueError, TypeError) as e:  # Torn, or JSON but not an object.
    raise DataError(f"config.checkpoint={workdir}: {path} cannot be read ({type(e).__name__});"
                    " it is torn or not a pre-training config, so nothing says what the"
                    " checkpoints are of; put that run's config.json back") from None
  return record


@functools.lru_cache(maxsize=16)
def _image_encode(model: Any, mean: tuple[float, ...], std: tuple[float, ...],
                  dtype: Any) -> Callable[[Any, jax.Array], jax.Array]:
  """encode(variables, uint8 images) of an image model: one function per architecture and
  normalization, so the encoders of a study's runs share one compiled feature step."""

  def encode(variables: Any, images: jax.Array) -> jax.Array:
    _, pooled = model.apply(variables, normalize(images, mean, std, dtype), train=False)
    return pooled.astype(jnp.float32)

  return encode


def load(workdir: str, *, step: int = -1, mesh: jax.sharding.Mesh | None = None,
         data_dir: str | None = None, pooling: str = "", max_length: int = 128) -> Encoder:
  """Restores the encoder of a pre-training workdir (step -1: its latest checkpoint) or of a
  Hugging Face text model folder; a text encoder pools as `pooling` ("": its family's default)
  over max_length tokens."""
  workdir = nmjax_io.absolute(workdir) if workdir else workdir
  mesh = mesh or parallel.make_mesh()
  if text_features.is_folder(workdir):
    text, variables = text_features.from_folder(workdir, pooling)
    variables = jax.device_put(variables, parallel.replicated(mesh))
    # Nothing records what a downloaded model was pre-trained on, or with what noise.
    pre = Pretraining("import", text.family, "unknown", "float32", "unknown", None, False, {}, {})
    return _text_encoder(workdir, 0, pre, text, variables, max_length)
  steps = _checkpoint_steps(workdir)
  record = read_record(workdir)
  pre = pretraining(record, where=f"config.checkpoint={workdir}: its config.json")
  if step >= 0 and step not in steps:
    raise ConfigError(f"config.step={step} is not a checkpoint of {workdir}; saved steps:"
                      f" {', '.join(map(str, sorted(steps)))}")
  # The newest usable step (damaged newer ones skipped with a warning), or the one asked for,
  # refused with its folder named when it cannot be used.
  step, state = checkpoint.load_state(workdir, step=step if step >= 0 else None,
                                      sharding=parallel.replicated(mesh))
  variables = {k: state[k] for k in ("params", "batch_stats")}
  if text_features.is_record(record):
    text = text_features.from_record(workdir, record, pooling)
    return _text_encoder(workdir, int(step), pre, text, variables, max_length)
  if pooling:
    raise ConfigError(f"config.pooling={pooling!r} is for text encoders; config.checkpoint holds"
                      f" {pre.model}, an image encoder (leave config.pooling empty)")
  if pre.job != "import":  # A run trained here knows where its data was (an import has none).
    data_dir = data_dir or record["data_dir"] or None
  if pre.clip:  # Pre-trained here (pretrain_clip) or imported (configs/import.py).
    return _clip_encoder(workdir, int(step), pre, record, variables, data_dir)
  info, transform = model_input(pre, record, data_dir)
  dtype = models.DTYPES[pre.dtype]
  model = models.get_model(pre.model, num_classes=info.num_classes, dtype=dtype,
                           **(pre.model_options or {}))
  args = (model, tuple(info.mean), tuple(info.std), dtype)
  try:
    encode = _image_encode(*args)
  except TypeError:  # A model with an unhashable option: its own function.
    encode = _image_encode.__wrapped__(*args)
  return Encoder(workdir=workdir, step=int(step), pretraining=pre, info=info,
                 variables=variables, encode=encode, feature_dim=model.feature_dim,
                 digest=content_digest(pre, variables), transform=transform)


def _text_encoder(workdir: str, step: int, pre: Pretraining, text: text_features.TextModel,
                  variables: Any, max_length: int) -> Encoder:
  """A text encoder's Encoder: its content digest covers the weights, the architecture, the
  pooling, max_length and the tokenizer's files."""
  text_features.check_length(text, max_length)
  pre = dataclasses.replace(pre, model_options=text.options,
                            input={"max_length": max_length, "tokenizer": text.tokenizer_digest})
  return Encoder(workdir=workdir, step=step, pretraining=pre, info=None, variables=variables,
                 encode=text_features.encode_fn(text.model),
                 feature_dim=text.model.feature_dim, digest=content_digest(pre, variables),
                 text=text, max_length=max_length)


def _clip_encoder(workdir: str, step: int, pre: Pretraining, record: Mapping[str, Any],
                  variables: Any, data_dir: str | None) -> Encoder:
  """A CLIP workdir's encoder: features are the image tower's unnormalized embedding (what
  the reference's probe uses); the text tower comes along for zero-shot."""
  from nmjax.models.clip_model import CLIP  # pylint: disable=g-import-not-at-top
  from nmjax.train import clip_training  # pylint: disable=g-import-not-at-top
  run = types.SimpleNamespace(**record)  # The fields its towers were built from, as attributes.
  model = clip_training.build_model(run)
  info = clip_training.source_info(run, data_dir=data_dir)
  mean, std, dtype = tuple(info.mean), tuple(info.std), model.dtype

  def encode(variables: Any, images: jax.Array) -> jax.Array:
    return model.apply(variables, normalize(images, mean, std, dtype), train=False,
                       method=CLIP.encode_image)

  def encode_text(variables: Any, tokens: jax.Array) -> jax.Array:
    return model.apply(variables, tokens, method=CLIP.encode_text)

  return Encoder(workdir=workdir, step=step, pretraining=pre, info=info, variables=variables,
                 encode=encode, feature_dim=model.feature_dim,
                 digest=content_digest(pre, variables), encode_text=encode_text,
                 context_length=int(record["context_length"]),
                 # An imported CLIP's own transform (CLIP's: crop 1.0, bicubic); else the default.
                 transform=EvalTransform.from_config(pre.input))


def open_cache(checkpoint: str, workdir: str, *, step: int, batch_size: int, batch_field: str,
               max_examples: int, data_dir: str, pooling: str = "", max_length: int = 128,
               file_sets: Sequence[text_sources.FileSet] = ()) -> "FeatureCache":
  """The prologue of every evaluation (after jax.distributed, where asked, has started): the
  mesh, the checkpoint's encoder and its features cache (falling back to `workdir`); a text
  encoder's pooling and max_length, and the text sets declared as files."""
  mesh = parallel.make_mesh()
  parallel.check_batch_size(batch_size, mesh, field=batch_field)
  enc = load(checkpoint, step=step, mesh=mesh, data_dir=data_dir or None, pooling=pooling,
             max_length=max_length)
  return FeatureCache(enc, workdir, batch_size=batch_size, max_examples=max_examples,
                      data_dir=data_dir or None, mesh=mesh, file_sets=file_sets)


def evenly_spaced(records: Sequence[Any], limit: int) -> Sequence[Any]:
  """At most `limit` records spread evenly over the split (every class of a sorted set shows)."""
  if limit <= 0 or len(records) <= limit:
    return records
  positions = np.linspace(0, len(records) - 1, limit).round().astype(np.int64)
  return records_lib.SubsetRecords(records, positions)


def _unwritable(root: str) -> str | None:
  """Why files cannot be written in the folder `root` (made when local); None when they can. In a
  bucket a small marker object is written: only a write tells whether this account may."""
  if not nmjax_io.is_cloud(root):
    try:
      os.makedirs(root, exist_ok=True)
    except OSError as e:
      return e.strerror or type(e).__name__
    return None if os.access(root, os.W_OK) else "not writable"
  try:
    nmjax_io.write_text(nmjax_io.join(root, WRITABLE_MARKER), "")
  except Exception as e:  # pylint: disable=broad-except
    # A bucket client's refusal is not always an OSError (gcsfs: HttpError for a 401).
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
  return None


WRITABLE_MARKER = ".writable"  # The object a bucket cache root is probed with (_unwritable).


def cache_root(encoder: Encoder, fallback_workdir: str) -> str:
  """Where an encoder's features are kept: beside its checkpoints, in
  CHECKPOINT/features/<content digest>/step_<N>/, one cache for every job that evaluates it
  (transfer, NMTune, a study's stages), a bucket checkpoint's in the bucket; under
  FALLBACK_WORKDIR/features/ when the checkpoint's folder cannot be written (a read-only copy,
  someone else's run)."""
  why = None
  for base in (encoder.workdir, fallback_workdir):
    root = nmjax_io.join(base, "features", encoder.identity, f"step_{encoder.step}")
    why = _unwritable(root)
    if why is None:
      if base != encoder.workdir:
        print(f"[features] {encoder.workdir} is not writable; caching features under {root}",
              flush=True)
      return root
  reason = f" ({why})" if nmjax_io.is_cloud(fallback_workdir) else ""
  raise ConfigError(f"--workdir={fallback_workdir}:"
                    f" {nmjax_io.join(fallback_workdir, 'features')} cannot be written{reason};"
                    " pass a writable directory")


class FeatureCache:
  """Features of dataset splits for one encoder, extracted on demand and kept as features files
  <split key>[-max<N>].npz under cache_root(encoder, workdir), which every job that evaluates
  the encoder shares. Files are written whole (nmjax.io) and keyed by the encoder's content and
  the split, so concurrent writers of one file write the same bytes and readers never see a torn
  one."""

  def __init__(self, encoder: Encoder, workdir: str, *, batch_size: int, max_examples: int,
               data_dir: str | None, mesh: jax.sharding.Mesh | None,
               file_sets: Sequence[text_sources.FileSet] = ()):
    self.encoder = encoder
    self.file_sets = {s.name: s for s in file_sets}  # Text sets given as files, by name.
    self.root = cache_root(encoder, workdir)
    self.batch_size = batch_size
    self.max_examples = max_examples
    self.data_dir = data_dir
    self.mesh = mesh
    self.extracted = 0  # Splits encoded (not read from the cache) by this process.

  @functools.lru_cache(maxsize=None)
  def info(self, dataset: str) -> sources.SourceInfo | text_sources.TextInfo:
    if self.encoder.text is not None:
      return self.text_source(dataset).info
    return sources.get_source(dataset, data_dir=self.data_dir).info

  @functools.lru_cache(maxsize=None)
  def text_source(self, dataset: str) -> text_sources.TextSource:
    """A text dataset's source (a text encoder's tasks)."""
    return text_sources.get_source(dataset, data_dir=self.data_dir, file_sets=self.file_sets)

  def path(self, split: tasks_lib.Split, suffix: str = "") -> str:
    """The split's features file (suffix: another array of the split, e.g. augmented views); a
    text set given as files is keyed by its files' content too."""
    limit = f"-max{self.max_examples}" if self.max_examples > 0 else ""
    if self.encoder.text is not None and self.info(split.dataset).digest:
      limit += f"-{self.info(split.dataset).digest}"
    return nmjax_io.join(self.root, f"{split.key}{limit}{suffix}.npz")

  def text_split(self, split: tasks_lib.Split) -> text_sources.TextSplit:
    """A text split's examples, at most max_examples spread evenly (the rows its features
    hold)."""
    examples = self.text_source(split.dataset).split(split.split)
    return examples.take(list(evenly_spaced(np.arange(len(examples)), self.max_examples)))

  def records(self, split: tasks_lib.Split) -> Sequence[Any]:
    """The split's examples at the encoder's input shape, capped at max_examples."""
    records, _ = tasks_lib.split_records(split, image_shape=self.encoder.image_shape,
                                         data_dir=self.data_dir,
                                         transform=self.encoder.transform)
    return evenly_spaced(records, self.max_examples)

  def get(self, split: tasks_lib.Split) -> features_lib.FeatureSet:
    path = self.path(split)
    num_classes = self.info(split.dataset).num_classes
    if nmjax_io.exists(path):
      try:
        return features_lib.load(path, num_classes=num_classes,
                                 feature_dim=self.encoder.feature_dim)
      except DataError as e:
        print(f"[features] ignoring a bad cached features file ({e}); extracting again",
              flush=True)
    values, labels = self._extract(split)
    self.extracted += 1
    if jax.process_index() == 0:
      features_lib.save(path, values, labels, domain=str(split), extra={
          "checkpoint": self.encoder.workdir, "step": self.encoder.step})
    return features_lib.FeatureSet(values, labels, domain=str(split), path=path)

  def _extract(self, split: tasks_lib.Split) -> tuple[np.ndarray, np.ndarray]:
    enc = self.encoder
    if enc.text is not None:
      return text_features.extract(enc.encode, enc.variables, enc.text, self.text_split(split),
                                   max_length=enc.max_length, batch_size=self.batch_size,
                                   mesh=self.mesh)
    batches = pipeline.eval_batches(self.records(split), batch_size=self.batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    return features_lib.extract(enc.encode, enc.variables, batches, mesh=self.mesh)

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
