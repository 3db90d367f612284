"""The transfer job, configs/transfer.py: probes (lp, ridge) and zero-shot over a checkpoint's
frozen features on downstream tasks, with SVE/LSVR of each task's test features; writes
results.jsonl, results.md, spectra.png and each fitted head in heads/<task>/<method>/
(nmjax.heads.load reads it; nmjax.evaluate does the work). A text encoder (a Hugging Face folder
or an import workdir of one: configs/text_transfer.py:job=transfer) runs on text tasks."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import ml_collections

from nmjax import encoder as encoder_lib, evaluate, io as nmjax_io, parallel, probe, \
  tasks as tasks_lib
from nmjax.clip import zeroshot
from nmjax.config import check_choice, check_range, parse_names
from nmjax.errors import ConfigError
from nmjax.jobs import plans, tables
from nmjax.jobs.pretrain_fields import check_distributed
from nmjax.jobs.text_fields import check_text_fields
from nmjax.jobs.workdir import prepare_workdir, process_index
from nmjax.progress import format_seconds

NAME = "transfer"
"""The job's name: config.job's value and its key in nmjax.jobs.JOBS."""


@dataclasses.dataclass(frozen=True)
class TransferPlan:
  """A transfer evaluation, resolved (configs/transfer.py).

  Attributes:
    checkpoint: the pre-training (or import) workdir whose encoder is evaluated, or a Hugging
      Face text model folder.
    tasks: nmjax.tasks registry names, and those text_files declares.
    methods: evaluate.TRANSFER_METHODS entries (lp, ridge, zeroshot).
    method_configs: each method's config, a plain dict (the classes are set per train split at
      run time).
  The other fields are the config's, one for one.
  """
  checkpoint: str
  tasks: tuple[str, ...]
  methods: tuple[str, ...]
  method_configs: dict[str, dict[str, Any]]
  step: int = -1                    # -1: the latest checkpoint
  spectral_center: str = "row"      # evaluate.CENTERS
  batch_size: int = 512             # feature extraction (global)
  max_examples: int = -1            # > 0: at most this many examples per split
  data_dir: str = ""
  pooling: str = ""                 # text encoders: "" (the model's) | cls | mean | last
  max_length: int = 128             # text encoders: tokens per example
  text_files: tuple[tasks_lib.FileTask, ...] = ()  # text sets given as files (config.text_files)
  distributed: str = "none"
  coordinator_address: str = ""
  num_processes: int = 1
  process_id: int = 0


def _method_configs(config: ml_collections.ConfigDict,
                    methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
  """Each method's fit config: the probes' (config.probe, checked), zero-shot's templates."""
  configs = {}
  for method in methods:
    if method == "zeroshot":
      zeroshot.templates_named(config.zeroshot_templates)  # An unknown name fails here.
      configs[method] = {"templates": config.zeroshot_templates}
    else:
      configs[method] = probe.resolve_config(config.probe.to_dict()).to_dict()
  return configs


def validate(config: ml_collections.ConfigDict) -> TransferPlan:
  """Checks every field of a transfer config once, before any work.

  Args:
    config: a complete transfer config (configs/transfer.py).

  Returns:
    The run's TransferPlan.

  Raises:
    ConfigError: with one line naming the field and the allowed values.
  """
  text = check_text_fields(config)
  tasks = tasks_lib.names(config.tasks, text["text_files"])
  methods = tuple(parse_names(config, "methods", evaluate.TRANSFER_METHODS))
  check_choice(config, "spectral_center", evaluate.CENTERS)
  check_range(config, "batch_size", low=1, integer=True)
  check_range(config, "max_examples", integer=True)
  check_range(config, "step", integer=True)
  check_distributed(config)
  return plans.from_config(TransferPlan, config, job=NAME, ignore=("probe", "zeroshot_templates"),
                           tasks=tasks, methods=methods,
                           method_configs=_method_configs(config, methods), **text)


def lock_index(plan: TransferPlan) -> int:
  """The index of this process's lock file (nmjax.io.lock_path) in the workdir.

  Args:
    plan: the run's plan.

  Returns:
    The process's index among the job's processes (explicit or auto mode), else 0.
  """
  return process_index(plan)


def method_config(plan: TransferPlan, method: str,
                  num_classes: int | None = None) -> ml_collections.ConfigDict:
  """What evaluate.METHODS[method] takes: the plan's config of the method, with its classes."""
  config = ml_collections.ConfigDict(plan.method_configs[method])
  config.num_classes = num_classes
  return config


def run(plan: TransferPlan, workdir: str) -> dict[str, Any]:
  """Runs the probes and SVE/LSVR on every task; writes results.jsonl, results.md, spectra.png
  and the fitted heads (heads/<task>/<method>/).

  Args:
    plan: the run's plan (validate).
    workdir: where the results go (made if needed).

  Returns:
    {"rows": the result rows, "features_extracted": how many splits were encoded (0 when the
    encoder's feature cache held them all)}.

  Raises:
    ConfigError: a checkpoint that is not a finished pre-training or import workdir, or method
      zeroshot on an encoder without a text tower.
    DataError: a task's dataset that is missing or malformed.
  """
  start = time.perf_counter()
  workdir = prepare_workdir(workdir)
  parallel.maybe_initialize_distributed(plan)
  cache = encoder_lib.open_cache(plan.checkpoint, workdir, step=plan.step,
                                 batch_size=plan.batch_size, batch_field="batch_size",
                                 max_examples=plan.max_examples, data_dir=plan.data_dir,
                                 pooling=plan.pooling, max_length=plan.max_length,
                                 file_sets=[t.files for t in plan.text_files])
  if "zeroshot" in plan.methods and cache.encoder.encode_text is None:  # Before any fit.
    raise ConfigError(f"config.methods entry 'zeroshot' needs a CLIP encoder (a pretrain_clip"
                      f" workdir); config.checkpoint holds {cache.encoder.pretraining.model}")
  chosen = tasks_lib.resolve(plan.tasks, plan.text_files)
  center = None if plan.spectral_center == "none" else plan.spectral_center
  keeper = tables.HeadKeeper(evaluate.probe_row)
  request = evaluate.Request(
      chosen, list(plan.methods), functools.partial(method_config, plan), keeper,
      spectral_center=center, spectrum_top_k=evaluate.SPECTRUM_TOP_K, prefix="[transfer]")
  result = evaluate.run(cache, request)
  enc = cache.encoder
  if jax.process_index() == 0:
    tables.save_heads(keeper.heads, workdir)
    header = tables.encoder_header(enc, "Accuracy in %, SVE/LSVR of the test features"
                                        f" (centering: {plan.spectral_center}).")
    table = tables.write_evaluation(result.rows, list(plan.methods), workdir,
                                    title="Transfer results", header=header)
    pre = enc.pretraining
    tables.plot_task_spectra(
        result.spectra, {t.name: t.kind for t in chosen}, nmjax_io.join(workdir, "spectra.png"),
        f"{pre.model}, {pre.dataset}, noise {pre.noise_ratio}, step {enc.step}")
    print(table, flush=True)
  print(f"[transfer] done in {format_seconds(time.perf_counter() - start)}; results in"
        f" {nmjax_io.join(workdir, 'results.jsonl')}, results.md, spectra.png and heads/",
        flush=True)
  return {"rows": result.rows, "features_extracted": result.features_extracted}
