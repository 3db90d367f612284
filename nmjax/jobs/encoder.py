"""A frozen encoder from a pre-training workdir: its config, model, weights and feature function.

Shared by the jobs that evaluate pre-trained models (transfer, nmtune). The weights are restored
from the workdir's orbax checkpoints onto the current mesh (replicated) from the checkpoint's own
metadata (nmjax.train.checkpoint.load_state), so a checkpoint saved on any number of devices
loads here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from nmjax import models, parallel
from nmjax.data import sources
from nmjax.errors import ConfigError, DataError
from nmjax.train import checkpoint
from nmjax.train.steps import normalize

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Encoder:
  """A frozen pre-trained model. features(variables, uint8 images) -> (n, D) pooled features."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict   # the pre-training config (config.json)
  info: sources.SourceInfo            # the pre-training dataset (input shape, normalisation)
  variables: Any                      # {"params", "batch_stats"}, replicated on the mesh
  features: Callable[[Any, jax.Array], jax.Array]
  feature_dim: int

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.info.image_shape)

  @property
  def identity(self) -> str:
    """Short hash of (real path, step): the key of cached features of this checkpoint."""
    text = f"{os.path.realpath(self.workdir)}@{self.step}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def load(workdir: str, *, step: int = -1, mesh: jax.sharding.Mesh | None = None,
         data_dir: str | None = None) -> Encoder:
  """Restores the encoder of a pre-training workdir (step -1: its latest checkpoint)."""
  if not workdir:
    raise ConfigError("config.checkpoint is empty; pass --config.checkpoint=PRETRAIN_WORKDIR")
  workdir = os.path.abspath(workdir)
  config_path = os.path.join(workdir, "config.json")
  checkpoints = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(workdir):
    raise ConfigError(f"config.checkpoint={workdir} does not exist; pass a pre-training workdir")
  if not os.path.isfile(config_path):
    raise DataError(f"config.checkpoint={workdir} has no config.json: not a pre-training workdir"
                    " (main.py --config configs/pretrain.py --workdir DIR writes one)")
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  steps = []
  if os.path.isdir(checkpoints):
    mngr = ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(create=False))
    steps = list(mngr.all_steps())
    mngr.close()
  if not steps:
    raise DataError(f"config.checkpoint={workdir} has no checkpoint (nothing committed under"
                    f" {checkpoints}); finish or resume the pre-training run first")
  if step < 0:
    step = max(steps)
  elif step not in steps:
    raise ConfigError(f"config.step={step} is not a checkpoint of {workdir}; saved steps:"
                      f" {', '.join(map(str, sorted(steps)))}")
  mesh = mesh or parallel.make_mesh()
  _, state = checkpoint.load_state(workdir, step=step, sharding=parallel.replicated(mesh))
  variables = {k: state[k] for k in ("params", "batch_stats")}

  source = sources.get_source(config.dataset, data_dir=data_dir or config.get("data_dir") or None)
  info = source.info
  model = models.get_model(config.model, num_classes=info.num_classes,
                           dtype=_DTYPES[config.get("dtype", "float32")])
  mean, std, dtype = tuple(info.mean), tuple(info.std), _DTYPES[config.get("dtype", "float32")]

  def features(variables: Any, images: jax.Array) -> jax.Array:
    _, pooled = model.apply(variables, normalize(images, mean, std, dtype), train=False)
    return pooled.astype(jnp.float32)

  return Encoder(workdir=workdir, step=int(step), config=config, info=info, variables=variables,
                 features=features, feature_dim=models.feature_dim(config.model))
