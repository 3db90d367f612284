"""Config helpers shared by configs/*.py and the jobs: the `file.py:k=v,flag` argument parser,
duration arithmetic (epochs <-> steps) and field validation that fails with one clear line."""

from __future__ import annotations

import copy
import difflib
from typing import Any, Callable, Iterable

import ml_collections

from nmjax.errors import ConfigError


def _coerce(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    if text.lower() in ("1", "true", "yes", ""):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ConfigError(f"config argument {key}={text!r} is not a boolean; allowed: true/false")
  for kind in (int, float):
    if isinstance(default, kind):
      try:
        return kind(text)
      except ValueError:
        raise ConfigError(
            f"config argument {key}={text!r} is not {kind.__name__}-valued") from None
  return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'k=v,k2=v2,flag' against typed defaults.

  A bare word sets a boolean default to True (e.g. `smoke`). Values are converted to the type of
  their default; unknown keys fail with the list of known ones.
  """
  parsed = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return parsed
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=2)
      hint = f"did you mean {' or '.join(close)}? " if close else ""
      raise ConfigError(f"config argument {key!r} is unknown; {hint}known:"
                        f" {', '.join(sorted(defaults))}")
    if "=" not in item and not isinstance(defaults[key], bool):
      raise ConfigError(f"config argument {key!r} needs a value ({key}=...)")
    parsed[key] = _coerce(key, value.strip(), defaults[key])
  return parsed


def check_choice(config: ml_collections.ConfigDict, field: str, allowed: Iterable[str]) -> None:
  allowed = tuple(allowed)
  value = config[field]
  if value not in allowed:
    raise ConfigError(f"config.{field}={value!r} is unknown; allowed: {', '.join(allowed)}")


def check_range(config: ml_collections.ConfigDict, field: str, *, low: float | None = None,
                high: float | None = None, low_inclusive: bool = True,
                high_inclusive: bool = True, integer: bool = False) -> None:
  """Fails with 'config.field=value is out of range; allowed: low <= field < high'."""
  value = config[field]
  ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
  if isinstance(value, bool) or not ok_type:
    kind = "an integer" if integer else "a number"
    raise ConfigError(f"config.{field}={value!r} is not {kind}")
  ok = True
  bounds = []
  if low is not None:
    ok &= value >= low if low_inclusive else value > low
    bounds.append(f"{low} {'<=' if low_inclusive else '<'} ")
  bounds.append(field)
  if high is not None:
    ok &= value <= high if high_inclusive else value < high
    bounds.append(f" {'<=' if high_inclusive else '<'} {high}")
  if not ok:
    raise ConfigError(f"config.{field}={value} is out of range; allowed: {''.join(bounds)}")


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Training steps in one epoch: the last partial batch of an epoch is dropped."""
  return num_examples // global_batch_size


def total_steps(*, num_examples: int, global_batch_size: int, num_epochs: float,
                num_train_steps: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps): num_train_steps > 0 wins over num_epochs."""
  epoch_steps = steps_per_epoch(num_examples, global_batch_size)
  if epoch_steps < 1:
    raise ConfigError(
        f"config.batch_size={global_batch_size} is larger than the training set"
        f" ({num_examples} examples); allowed: 1 <= batch_size <= {num_examples}")
  if num_train_steps > 0:
    return epoch_steps, int(num_train_steps)
  return epoch_steps, max(1, int(round(num_epochs * epoch_steps)))


def add_distributed_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """How the job's processes find each other (nmjax.parallel.maybe_initialize_distributed)."""
  config.distributed = "none"       # none | auto (TPU pods, SLURM, Open MPI) | explicit:
  config.coordinator_address = ""  # explicit: 'host:port' of process 0, the same everywhere.
  config.num_processes = 1          # explicit: how many processes in all.
  config.process_id = 0             # explicit: this process, 0..num_processes-1.
  return config


def add_run_fields(config: ml_collections.ConfigDict, *,
                   data_dir: str = "") -> ml_collections.ConfigDict:
  """Fields every pre-training run (supervised or CLIP) sets beside its experiment's: where the
  data is, debug output, what a resume may change, and how its processes find each other."""
  config.data_dir = data_dir        # Empty: $NMJAX_DATA_DIR or ~/.cache/nmjax.
  config.record_examples = False    # Debug: workdir/examples_seen.jsonl, each step's indices.
  config.profile_steps = ""         # "N,M": a jax.profiler trace of steps N..M in workdir/profile.
  # Comma-separated training fields (e.g. learning_rate,num_train_steps) this run may change
  # when it resumes a checkpoint; config.json records each change (nmjax.train.supervised).
  config.allow_changes = ""
  return add_distributed_fields(config)


def add_extraction_fields(config: ml_collections.ConfigDict, *, batch_field: str,
                          smoke: bool) -> ml_collections.ConfigDict:
  """How features are extracted: the batch (named `batch_field`) and a cap per split."""
  config[batch_field] = 512         # Feature extraction batch (global; divisible by the devices).
  config.max_examples = -1          # > 0: at most this many examples per split (smoke runs).
  if smoke:
    config.max_examples = 400
    config[batch_field] = 200
  return config


def add_encoder_fields(config: ml_collections.ConfigDict, *, tasks: str,
                       smoke: bool) -> ml_collections.ConfigDict:
  """Which checkpoint an evaluation reads and which tasks it runs (two small ones with
  `smoke`), where the data is and how its processes find each other."""
  config.checkpoint = ""            # A pre-training workdir (its config.json and checkpoints/).
  config.step = -1                  # Checkpoint step; -1: the latest.
  config.tasks = "digits,mnist_to_digits" if smoke else tasks.replace("+", ",")
  config.data_dir = ""              # Empty: $NMJAX_DATA_DIR or ~/.cache/nmjax.
  return add_distributed_fields(config)


def overlay(defaults: ml_collections.ConfigDict, given: Any, *, what: str,
            tuple_fields: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """`defaults` with the fields of `given` (a ConfigDict, a dict or None) set on it.

  An unknown field fails naming `what`, the known fields and the closest ones (difflib: "did you
  mean"); a value of the wrong type fails naming the field. Lists become tuples in `tuple_fields`
  (JSON round trips make lists).
  """
  if given is None:
    return defaults
  tuple_fields = set(tuple_fields)
  for key in given.keys():
    if key not in defaults:
      known = sorted(defaults.keys())
      close = difflib.get_close_matches(str(key), known, n=2)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      raise ConfigError(f"{what} config field {key!r} is unknown; known: {', '.join(known)}{hint}")
    value = given[key]
    if key in tuple_fields and isinstance(value, list):
      value = tuple(value)
    try:
      defaults[key] = value
    except TypeError:
      raise ConfigError(f"config.{key}={value!r} has the wrong type; expected"
                        f" {type(defaults[key]).__name__} like the default") from None
  return defaults


def probe_fields() -> ml_collections.ConfigDict:
  """The reference linear-probe protocol plus the ridge probe's grid (nmjax.probe), locked."""
  config = ml_collections.ConfigDict()
  config.learning_rate = 1e-2
  config.weight_decay = 1e-4
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-8
  config.batch_size = 64
  config.num_epochs = 30
  config.seed = 0  # Head init and shuffling (linear_probe); the held-out split (ridge_probe).
  # None: max label + 1 over the train and test splits.
  config.num_classes = ml_collections.config_dict.placeholder(int)
  # None, or the classes the test set may be predicted as (e.g. ImageNet-R's 200 of ImageNet's
  # 1,000): test predictions are the argmax over these logits only; training is unchanged.
  config.logit_subset = ml_collections.config_dict.placeholder(tuple)
  # Per-example penalties (the penalty on ||W||^2 is lambda * n): 10^-6 .. 10^2, half decades.
  config.ridge_lambdas = tuple(float(10.0 ** (e / 2)) for e in range(-12, 5))
  config.ridge_holdout_fraction = 0.2
  config.lock()
  return config


def nmtune_hparams() -> ml_collections.ConfigDict:
  """The NMTune fit's hyperparameters (the reference implementation's defaults), unlocked: what a
  sweep sets once for all its fits. The reference's flag names mse_weight / cov_weight /
  svd_weight weigh nmjax.nmtune's consistency_loss / covariance_loss /
  dominant_singular_value_loss."""
  config = ml_collections.ConfigDict()
  config.epochs = 30
  config.batch_size = 128       # Rows per step (n): the reference's 2 views x 64 images.
  config.lr = 1e-3
  config.weight_decay = 1e-4
  config.mse_weight = 1.0
  config.cov_weight = 0.04
  config.svd_weight = 0.001
  config.svd_topk = 5
  config.mlp_ratio = 4.0
  config.mlp_layers = 1
  config.residual_scale_init = 1.0
  # > 0: a seeded (config.seed), stratified share of each train class held out as a validation
  # split (never the test set); results then carry val_accuracy.
  config.val_fraction = 0.0
  # A grid of configurations trained in one program, the one with the best validation accuracy
  # chosen, e.g. "svd_weight=0.001,0.01;cov_weight=0.04,0.4" (syntax: nmjax/nmtune/grid.py;
  # needs val_fraction > 0). Empty: one fit.
  config.grid = ""
  config.grid_refit = True  # The chosen configuration fit again on all of train (False: as chosen).
  # method "lp": the linear probe's own protocol; method "lp_aug": its learning rate and weight
  # decay (num_classes, logit_subset and seed come from the NMTune config).
  config.lp = probe_fields()
  return config


def nmtune_fields() -> ml_collections.ConfigDict:
  """One NMTune fit's config (nmjax.nmtune.default_config): the method, the hyperparameters,
  the seed and the classes, locked."""
  config = ml_collections.ConfigDict()
  config.method = "nmtune"      # nmtune | mlp | lp_aug
  config.update(nmtune_hparams())
  config.seed = 0
  # None: max train label + 1 (test labels must fall below it).
  config.num_classes = ml_collections.config_dict.placeholder(int)
  # None, or the classes a test set may be predicted as (see nmjax.probe).
  config.logit_subset = ml_collections.config_dict.placeholder(tuple)
  config.lock()
  return config


def parse_names(config: ml_collections.ConfigDict, field: str,
                allowed: Iterable[str]) -> list[str]:
  """A comma-separated config field (older commands joined it with '+', still read) as a list
  without repeats, each entry one of `allowed`."""
  allowed = tuple(allowed)
  names = [n.strip() for n in str(config[field]).replace("+", ",").split(",") if n.strip()]
  if not names:
    raise ConfigError(f"config.{field} is empty; allowed: {', '.join(allowed)}")
  for name in names:
    if name not in allowed:
      raise ConfigError(f"config.{field} entry {name!r} is unknown; allowed: {', '.join(allowed)}")
  return list(dict.fromkeys(names))


def tuning_fields(*, views: str = "features", smoke: bool = False) -> ml_collections.ConfigDict:
  """What an NMTune evaluation sets once for all its fits (the study's config.nmtune): the fit
  hyperparameters, the train views and the feature extraction."""
  config = nmtune_hparams()
  config.views = views      # features | online (the reference data flow) | cached
  config.cached_views = 4   # views="cached": augmented views encoded per train image.
  # Method zeroshot (a CLIP encoder): "imagenet" (the CLIP paper's 80 prompts) or "simple".
  config.zeroshot_templates = "imagenet"
  add_extraction_fields(config, batch_field="extract_batch_size", smoke=smoke)
  if smoke:
    config.epochs = 2
    with config.lp.unlocked():
      config.lp.num_epochs = 2
  return config


def tuning_config(tuning: ml_collections.ConfigDict, *, methods: str, tasks: str,
                  smoke: bool = False) -> ml_collections.ConfigDict:
  """An NMTune job's config (configs/nmtune.py): the fit's fields, `tuning`'s values, the
  methods, and either features files or a checkpoint and tasks."""
  config = nmtune_fields()
  config.unlock()
  for key in tuning.keys():
    config[key] = copy.deepcopy(tuning[key])
  config.job = "nmtune"
  config.methods = methods.replace("+", ",")  # Comma-separated: lp, lp_aug, mlp, nmtune, zeroshot.
  config.method = ""  # Deprecated alias of methods: when set, the job reads it as methods.
  config.train_features = ""  # Black-box mode: features files (.npz) of the train and test sets.
  config.test_features = ""
  return add_encoder_fields(config, tasks=tasks, smoke=smoke)


def pretrain_experiment(*, dataset: str, model: str, noise_type: str, epochs: float,
                        smoke: bool) -> ml_collections.ConfigDict:
  """A pre-training run's fields but its noise ratio, seed and where it runs: what a sweep
  (the study's config.pretrain) fixes for every point."""
  config = ml_collections.ConfigDict()
  config.dataset = dataset
  config.model = model
  config.noise_type = noise_type  # symmetric | pairflip
  config.num_epochs = epochs
  config.num_train_steps = -1  # > 0 wins over num_epochs.
  config.batch_size = 128      # Global, over all devices and processes.
  config.eval_batch_size = 512
  config.max_train_examples = -1  # > 0 trains on the first N records only (smoke runs).
  config.max_test_examples = -1
  config.optimizer = "sgd"     # sgd (momentum) | adamw
  config.learning_rate = 0.1   # Peak, after warm-up.
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4   # Kernels only (not BatchNorm or biases).
  config.warmup_epochs = 0.5
  config.label_smoothing = 0.0
  # default: the in-memory images, random crop after zero padding, flip; imagenet: JPEGs decoded
  # and random-resized-cropped to image_size in grain workers (nmjax/data/imagenet.py).
  config.input_pipeline = "default"
  config.crop_padding = 2      # default: random crop after zero padding by this many pixels.
  config.image_size = 0        # imagenet: the crop's side (default: the dataset's own size, 0).
  config.data_workers = 0      # imagenet: grain worker processes per host (batches do not vary).
  config.flip = True           # Horizontal flip, applied only where the dataset allows it.
  config.eval_split = "test"   # The split evaluated (imagenet2012: validation).
  config.dtype = "float32"     # Compute dtype: float32 | bfloat16 (params stay float32).
  config.eval_every_epochs = 1  # Test accuracy every N epochs (0: never) and after the last step.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.max_to_keep = 3
  # Axis:size pairs over all devices of all processes (-1 takes the rest), e.g. data:4,model:2;
  # param_sharding=model splits kernels of >= 2**18 elements over 'model' (nmjax/parallel.py).
  config.mesh = "data:-1"
  config.param_sharding = "replicated"  # replicated | model
  if smoke:
    config.num_train_steps = 12
    config.batch_size = 32
    config.eval_batch_size = 80
    config.max_train_examples = 160
    config.max_test_examples = 250
    config.warmup_epochs = 0.0
    config.log_every_steps = 4
    config.checkpoint_every_steps = 4
  return config


def pretrain_run(experiment: ml_collections.ConfigDict, *, noise_ratio: float, seed: int,
                 data_dir: str = "") -> ml_collections.ConfigDict:
  """A pre-training job's config: `experiment` at one noise ratio and seed, run locally."""
  config = ml_collections.ConfigDict(experiment.to_dict())
  config.job = "pretrain"
  config.noise_ratio = float(noise_ratio)
  config.seed = int(seed)
  return add_run_fields(config, data_dir=data_dir)


def clip_experiment(*, dataset: str, model: str, variant: str = "") -> ml_collections.ConfigDict:
  """A CLIP pre-training run's fields but its caption noise, seed and where it runs.

  Defaults are the reference implementation's YFCC15M recipe and open_clip's defaults for
  what it leaves out (open_clip_train/params.py, RN models): AdamW b1 0.9, b2 0.999, eps 1e-8,
  weight decay 0.2 (not on gains, biases or the temperature), 10,000 warm-up steps then cosine;
  lr 5e-4, 32 epochs and a global batch of 256 at every noise ratio (the reference used 512 at
  10% and 20%). variant: "" (that recipe), "embedded" (the small towers on 28x28 pairs, minutes
  on a CPU) or "smoke" (seconds, for tests).
  """
  config = ml_collections.ConfigDict()
  config.dataset = dataset
  config.model = model
  config.quick_gelu = False     # True for OpenAI/open_clip RN50 weights (RN50-quickgelu).
  config.loss = "softmax"       # softmax (CLIP's InfoNCE) | sigmoid (SigLIP)
  config.context_length = 77
  config.held_out_pairs = 10000  # Real sets: their last N pairs are held out (never trained on).
  config.num_epochs = 32.0
  config.num_train_steps = -1   # > 0 wins over num_epochs.
  config.batch_size = 256       # Global, fixed across caption-noise ratios.
  config.eval_batch_size = 256  # In-batch retrieval on held-out pairs uses batches this big.
  config.max_train_examples = -1
  config.max_test_examples = -1
  config.optimizer = "adamw"
  config.learning_rate = 5e-4
  config.weight_decay = 0.2
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999        # open_clip: 0.98 (and eps 1e-6) for ViT towers.
  config.adam_eps = 1e-8
  config.warmup_steps = 10000
  config.crop_padding = 0       # Embedded sets: random crop after zero padding (0: none).
  config.flip = False
  config.dtype = "bfloat16"     # Compute dtype on accelerators (params stay float32).
  config.eval_every_epochs = 1
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  config.max_to_keep = 3
  config.mesh = "data:-1"       # e.g. data:4,model:2 (nmjax/parallel.py)
  config.param_sharding = "replicated"
  config.data_workers = 8       # Real (JPEG) pairs: decoding worker processes.
  config.image_size = 224       # Real (JPEG) pairs: the crop the image tower takes.
  if variant in ("embedded", "smoke"):
    _small_clip_run(config, smoke=variant == "smoke")
  return config


def _small_clip_run(config: ml_collections.ConfigDict, *, smoke: bool) -> None:
  """The embedded (minutes on a CPU) and smoke (seconds) sizes of a CLIP run, in place."""
  config.context_length = 16  # The embedded captions are at most 13 tokens with start and end.
  config.dtype = "float32"
  config.num_epochs = 6.0
  config.learning_rate = 1e-3
  config.weight_decay = 0.1
  config.warmup_steps = 50
  config.crop_padding = 2
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.data_workers = 0
  if smoke:
    config.num_train_steps = 12
    config.batch_size = 32
    config.eval_batch_size = 64
    config.max_train_examples = 320
    config.max_test_examples = 128
    config.warmup_steps = 2
    config.log_every_steps = 4
    config.checkpoint_every_steps = 4


def clip_run(experiment: ml_collections.ConfigDict, *, caption_noise: float, seed: int,
             data_dir: str = "") -> ml_collections.ConfigDict:
  """A CLIP pre-training job's config: `experiment` at one caption-noise ratio and seed."""
  config = ml_collections.ConfigDict(experiment.to_dict())
  config.job = "pretrain_clip"
  config.caption_noise = float(caption_noise)
  config.seed = int(seed)
  return add_run_fields(config, data_dir=data_dir)


def parse_numbers(config: ml_collections.ConfigDict, field: str, kind: type,
             check: Callable[[Any], bool], allowed: str) -> list:
  """A comma-separated list of numbers in a config field, each checked, no duplicates."""
  items = [t.strip() for t in str(config[field]).split(",") if t.strip()]
  if not items:
    raise ConfigError(f"config.{field} is empty; allowed: {allowed}")
  values = []
  for item in items:
    try:
      value = kind(item)
    except ValueError:
      what = "an integer" if kind is int else "a number"
      raise ConfigError(f"config.{field} entry {item!r} is not {what};"
                        f" allowed: {allowed}") from None
    if not check(value):
      raise ConfigError(f"config.{field} entry {item!r} is out of range; allowed: {allowed}")
    if value in values:
      raise ConfigError(f"config.{field} lists {item!r} twice")
    values.append(value)
  return values
