"""The pre-training job: checks the config, makes the workdir, runs nmjax.train.pretrain."""

from __future__ import annotations

from typing import Any

import ml_collections

from nmjax.jobs import prepare_workdir
from nmjax.train import pretrain
from nmjax.train.pretrain import validate


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pre-trains in `workdir` (created if needed); returns the last epoch's record."""
  validate(config)  # A bad config fails before the workdir is made.
  return pretrain.run(config, prepare_workdir(workdir))
