"""Config helpers shared by configs/*.py and the jobs: the `file.py:k=v,flag` argument parser,
duration arithmetic (epochs <-> steps) and field validation that fails with one clear line."""

from __future__ import annotations

from typing import Any, Iterable

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
      raise ConfigError(
          f"config argument {key!r} is unknown; known: {', '.join(sorted(defaults))}")
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


def add_run_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fields every pre-training config shares: data location, debug log, scale-out.

  The mesh is axis:size pairs over all devices of all processes (-1 takes the rest); 'model'
  only matters with param_sharding=model, which splits kernels of >= 2**18 elements over it
  (their optimizer state follows). See nmjax/parallel.py.
  """
  config.data_dir = ""              # Empty: $NMJAX_DATA_DIR or ~/.cache/nmjax.
  config.record_examples = False    # Debug: workdir/examples_seen.jsonl, each step's indices.
  config.mesh = "data:-1"           # e.g. data:4,model:2
  config.param_sharding = "replicated"  # replicated | model
  return add_distributed_fields(config)


def add_encoder_fields(config: ml_collections.ConfigDict, *, tasks: str, batch_field: str,
                       smoke: bool) -> ml_collections.ConfigDict:
  """Fields the jobs that evaluate a pre-trained encoder share (transfer, nmtune): which
  checkpoint, which tasks, the extraction batch (named `batch_field`), data, scale-out; with
  `smoke`, two small tasks capped at 400 examples per view."""
  config.checkpoint = ""            # A pre-training workdir (its config.json and checkpoints/).
  config.step = -1                  # Checkpoint step; -1: the latest.
  config.tasks = tasks.replace("+", ",")  # nmjax/tasks.py names or groups.
  config[batch_field] = 512         # Feature extraction batch (global; divisible by the devices).
  config.max_examples = -1          # > 0: at most this many examples per view (smoke runs).
  config.data_dir = ""              # Empty: $NMJAX_DATA_DIR or ~/.cache/nmjax.
  add_distributed_fields(config)
  if smoke:
    config.tasks = "digits,mnist->digits"
    config.max_examples = 400
    config[batch_field] = 200
  return config


def overlay(defaults: ml_collections.ConfigDict, given: Any, *, what: str,
            tuple_fields: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """`defaults` with the fields of `given` (a ConfigDict, a dict or None) set on it.

  An unknown field fails naming `what` and the known fields; a value of the wrong type fails
  naming the field. Lists become tuples in `tuple_fields` (JSON round trips make lists).
  """
  if given is None:
    return defaults
  tuple_fields = set(tuple_fields)
  for key in given.keys():
    if key not in defaults:
      raise ConfigError(f"{what} config field {key!r} is unknown; known:"
                        f" {', '.join(sorted(defaults.keys()))}")
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
  """The NMTune fit's hyperparameters (REFERENCE.md s.4 defaults), unlocked: what a sweep sets
  once for all its fits. The reference's flag names mse_weight / cov_weight / svd_weight weigh
  nmjax.nmtune's consistency_loss / covariance_loss / dominant_singular_value_loss."""
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
