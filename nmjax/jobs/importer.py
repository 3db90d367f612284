"""The import job, configs/import.py: a PyTorch/safetensors checkpoint file becomes an nmjax
pre-training workdir (nmjax.convert), checked against a reference file when one is given.

validate(config) -> ImportPlan checks every field before any work (the architecture, the file, the
reference file, the evaluation input the user set); run(plan, workdir) reads, converts, checks
and writes. A CLIP arch's workdir is a CLIP workdir: its config.json carries what
nmjax.train.clip_training.build_model and source_info read (model, dtype, quick_gelu, loss,
context_length, image_size, dataset) and caption_noise (the reports' r), so nmjax.encoder
restores it as a CLIP encoder (image embeddings as features, the text tower for zero-shot).

A folder source is a Hugging Face text model (BERT, RoBERTa, GPT-2; nmjax.convert.hf_text), its
architecture read from its config.json (config.arch stays empty). Its workdir's config.json
carries `text_config` (the fields of nmjax.models.text_encoders.TextConfig) and `pooling`, and
the folder's tokenizer files are copied to WORKDIR/tokenizer/ (nmjax.text.tokenizer reads them
there)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from nmjax import convert, io as nmjax_io
from nmjax.config import check_range
from nmjax.convert import clip_layouts, hf_text, readers
from nmjax.errors import ConfigError, DataError
from nmjax.jobs import plans
from nmjax.jobs.workdir import prepare_workdir, single_process
from nmjax.models import text_encoders
from nmjax.progress import format_seconds
from nmjax.text import TOKENIZER_FILES

NAME = "import"
"""The job's name: config.job's value and its key in nmjax.jobs.JOBS."""


@dataclasses.dataclass(frozen=True)
class InputPlan:
  """The evaluation transform the user set (mean/std in 0..1 units); None leaves a field to the
  file's Hugging Face config.json or the architecture (nmjax.convert.eval_input)."""
  image_size: int | None = None
  crop_pct: float | None = None
  interpolation: str | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ImportPlan:
  """An import, checked: the file or Hugging Face folder (absolute path) and its architecture (a
  folder's: empty, read from its config.json), what it was pre-trained on (reports only), the
  evaluation input set, and the reference check."""
  source: str
  arch: str = ""
  pooling: str | None = None  # A text model's pooled vector; None: its family's.
  quick_gelu: bool | None = None  # CLIP only; None: the arch name's (the file may refuse it).
  dataset: str = "unknown"
  noise_ratio: float | None = None
  noise_type: str = "symmetric"
  input: InputPlan = dataclasses.field(default_factory=InputPlan)
  reference: str = ""             # As given (messages name it); config.json holds its abspath.
  reference_tolerance: float = 1e-3
  trust_pickle: bool = False


def _input_plan(given: ml_collections.ConfigDict) -> InputPlan:
  unknown = sorted(set(given.keys()) - set(convert.INPUT_FIELDS))
  if unknown:
    raise ConfigError(f"config.input field {unknown[0]!r} is unknown; known:"
                      f" {', '.join(convert.INPUT_FIELDS)}")
  chosen = plans.from_config(InputPlan, given, job=NAME)
  for field in ("mean", "std"):
    values = getattr(chosen, field)
    if values is not None and not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      raise ConfigError(f"config.input.{field}={values!r} must be numbers (0..1 units)")
  convert.check_transform(chosen.crop_pct, chosen.interpolation)
  return chosen


def validate(config: ml_collections.ConfigDict) -> ImportPlan:
  """Checks every field of an import config once, before any work.

  The architecture, the QuickGELU switch, the file, the reference file, the tolerance and the
  evaluation input are checked.

  Args:
    config: a complete import config (configs/import.py).

  Returns:
    The import's ImportPlan (the file's path made absolute).

  Raises:
    ConfigError: with one line naming the field and the allowed values.
    DataError: a checkpoint file that is missing, not a regular file, not of its kind (text,
      empty, truncated), or (untrusted) a TorchScript archive that cannot be read as data.
  """
  plan = plans.from_config(ImportPlan, config, job=NAME, input=InputPlan())
  if nmjax_io.isdir(plan.source):
    return _validate_text(plan, config)
  if not plan.arch:
    raise ConfigError(f"config.arch is empty; the checkpoint file {plan.source} needs its"
                      f" architecture, one of {', '.join([*convert.ARCHS, *convert.CLIP_ARCHS])}"
                      " (only a Hugging Face folder's is read from its config.json)")
  if plan.pooling is not None:
    raise ConfigError(f"config.pooling is a text model's option; config.arch={plan.arch} takes"
                      " none (leave it unset)")
  convert.check_arch(plan.arch)
  if convert.is_clip(plan.arch):
    clip_layouts.resolve_quick_gelu(plan.arch, plan.quick_gelu)
  elif plan.quick_gelu is not None:
    raise ConfigError(f"config.quick_gelu is a CLIP option; config.arch={plan.arch} takes"
                      " none (leave it unset)")
  readers.check_path(plan.source, trust_pickle=plan.trust_pickle)
  _check_reference_and_noise(plan, config, "inputs and logits and/or features")
  return dataclasses.replace(plan, source=nmjax_io.absolute(plan.source),
                             input=_input_plan(config.input))


def _check_reference_and_noise(plan: ImportPlan, config: ml_collections.ConfigDict,
                               holds: str) -> None:
  """config.reference (a file holding `holds`), its tolerance and the noise ratio."""
  why = readers.not_a_file(plan.reference) if plan.reference else None
  if why:
    raise ConfigError(f"config.reference={plan.reference} {why}; pass an .npz with {holds}, or"
                      " leave it empty")
  check_range(config, "reference_tolerance", low=0.0, low_inclusive=False)
  if plan.noise_ratio is not None:
    check_range(config, "noise_ratio", low=0.0, high=1.0)


def _validate_text(plan: ImportPlan, config: ml_collections.ConfigDict) -> ImportPlan:
  """validate's checks for a Hugging Face text folder: its config.json's architecture and its
  weight files, no image or CLIP fields, the reference file and the numbers."""
  if plan.arch:
    raise ConfigError(f"config.arch={plan.arch!r}, but config.source={plan.source} is a folder: a"
                      " Hugging Face text model whose config.json says its architecture; leave"
                      " config.arch empty")
  hf_text.text_config(hf_text.folder_config(plan.source),
                      nmjax_io.join(plan.source, "config.json"))
  hf_text.weight_files(plan.source)
  if plan.pooling is not None and plan.pooling not in text_encoders.POOLINGS:
    raise ConfigError(f"config.pooling={plan.pooling!r} is unknown; allowed:"
                      f" {', '.join(text_encoders.POOLINGS)}")
  if plan.quick_gelu is not None:
    raise ConfigError("config.quick_gelu is a CLIP option; a text model takes none (leave it"
                      " unset)")
  stated = [k for k, v in dataclasses.asdict(plan.input).items() if v is not None]
  if stated:
    raise ConfigError(f"config.input.{stated[0]} is an image model's evaluation input; a text"
                      " model takes none (leave config.input unset)")
  _check_reference_and_noise(plan, config, "ids, mask and hidden_states and/or pooled")
  return dataclasses.replace(plan, source=nmjax_io.absolute(plan.source))


lock_index = single_process  # One process: lock file 0.


def _check_reference(imported: convert.Imported | hf_text.TextImport,
                     plan: ImportPlan) -> dict[str, float]:
  text = isinstance(imported, hf_text.TextImport)
  differences = convert.compare(imported, plan.reference)
  for output, difference in differences.items():
    print(f"[import] reference {plan.reference}: {output} largest relative difference"
          f" {difference:.3g}", flush=True)
  worst = max(differences, key=differences.get)
  if differences[worst] > plan.reference_tolerance:
    raise DataError(f"the imported model's {worst} differ from {plan.reference} by"
                    f" {differences[worst]:.3g} (relative), more than"
                    f" config.reference_tolerance={plan.reference_tolerance}: the file is not"
                    f" a {imported.model_type if text else plan.arch} as nmjax reads it, or the"
                    " reference was made on another input; nothing was written")
  return differences


def clip_fields(imported: convert.Imported, plan: ImportPlan) -> dict[str, Any]:
  """What a CLIP workdir's config.json says beyond an import's: the fields
  nmjax.train.clip_training.build_model and source_info read, and the caption noise (the
  fraction of pairs pre-trained with another pair's caption: plan.noise_ratio)."""
  return {"quick_gelu": bool(imported.spec.options["quick_gelu"]), "loss": "softmax",
          "context_length": int(imported.model.context_length),
          "image_size": int(imported.spec.image_size), "caption_noise": plan.noise_ratio,
          "noise_type": "caption"}


def workdir_record(plan: ImportPlan, imported: convert.Imported, sha256: str,
                   model_input: dict[str, Any], differences: dict[str, float] | None
                   ) -> dict[str, Any]:
  """The workdir's config.json: the import's fields (sorted, as a config lists them), then what
  the file said; a CLIP's with clip_fields."""
  fields = {"job": NAME, **plans.as_dict(plan)}
  record = {key: fields[key] for key in sorted(fields)}
  record.update({
      "input": model_input,
      "reference": nmjax_io.absolute(plan.reference) if plan.reference else "",
      "source_sha256": sha256, "model": convert.check_arch(plan.arch).model,
      "model_options": imported.spec.options, "num_classes": imported.spec.num_classes,
      "dtype": "float32", "reference_difference": differences})
  if convert.is_clip(plan.arch):
    record.update(clip_fields(imported, plan))
  return record


def _describe(plan: ImportPlan, imported: convert.Imported, sha256: str,
              model_input: dict[str, Any]) -> str:
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(imported.variables["params"]))
  what = (f"{'QuickGELU' if imported.spec.options['quick_gelu'] else 'exact GELU'}, image"
          f" features {imported.model.feature_dim}-d" if convert.is_clip(plan.arch)
          else f"{imported.spec.num_classes} classes")
  return (f"[import] {plan.arch} from {plan.source} (sha256 {sha256[:16]}): {count:,}"
          f" parameters, {what}; evaluated at {model_input['image_size']}px, crop"
          f" {model_input['crop_pct']}, {model_input['interpolation']}")


def run(plan: ImportPlan, workdir: str) -> dict[str, Any]:
  """Imports plan.source into `workdir`, a pre-training workdir every evaluation job reads.

  Args:
    plan: the import's plan (validate).
    workdir: the new workdir (made if needed); the same import there again writes nothing.

  Returns:
    {"workdir", "record" (its config.json record), "written" (whether anything was written),
    "differences" (the reference check's, None without a reference)}.

  Raises:
    ConfigError: a workdir that holds something else.
    DataError: a file that is unreadable or not that architecture, or outputs that differ from
      the reference file's by more than reference_tolerance.
  """
  start = time.perf_counter()
  workdir = prepare_workdir(workdir)
  if nmjax_io.isdir(plan.source):
    return _run_text(plan, workdir, start)
  sha256 = readers.file_sha256(plan.source)
  imported = convert.read(plan.source, plan.arch, trust_pickle=plan.trust_pickle,
                          quick_gelu=plan.quick_gelu)
  model_input = convert.eval_input(imported, plan.source, dataclasses.asdict(plan.input),
                                   dataset=plan.dataset)
  print(_describe(plan, imported, sha256, model_input), flush=True)
  differences = _check_reference(imported, plan) if plan.reference else None
  record = workdir_record(plan, imported, sha256, model_input, differences)
  written = convert.save_workdir(workdir, record, imported)
  state = "written" if written else "already there (the same import), left as it was"
  print(f"[import] {workdir}: config.json and checkpoints/0 {state}, in"
        f" {format_seconds(time.perf_counter() - start)}; evaluate it with --config.checkpoint="
        f"{workdir}", flush=True)
  return {"workdir": workdir, "record": record, "written": written, "differences": differences}


# ------------------------------------------------------------------------ Hugging Face text

TOKENIZER_DIR = "tokenizer"  # WORKDIR/tokenizer/: the folder's tokenizer files, copied.


def tokenizer_files(folder: str) -> dict[str, bytes]:
  """{tokenizer/NAME: bytes} of the folder's tokenizer files (nmjax.text's TOKENIZER_FILES)."""
  return {f"{TOKENIZER_DIR}/{name}": nmjax_io.read_bytes(nmjax_io.join(folder, name))
          for name in TOKENIZER_FILES if nmjax_io.isfile(nmjax_io.join(folder, name))}


def text_record(plan: ImportPlan, imported: hf_text.TextImport, sha256: str,
                differences: dict[str, float] | None, tokenizer: bool) -> dict[str, Any]:
  """A text import's config.json: the import's fields, then what the folder said (the model
  type as `model`, `text_config`, `pooling`, whether a tokenizer was copied)."""
  fields = {"job": NAME, **plans.as_dict(plan)}
  record = {key: fields[key] for key in sorted(fields)}
  pooling = imported.model.pooling
  record.update({
      "input": {}, "reference": nmjax_io.absolute(plan.reference) if plan.reference else "",
      "source_sha256": sha256, "model": imported.model_type,
      "model_options": {"pooling": pooling}, "num_classes": 0, "dtype": "float32",
      "reference_difference": differences, "text_config": dataclasses.asdict(imported.config),
      "pooling": pooling, "tokenizer": TOKENIZER_DIR if tokenizer else None})
  return record


def _run_text(plan: ImportPlan, workdir: str, start: float) -> dict[str, Any]:
  """run() for a Hugging Face text folder."""
  imported = hf_text.read(plan.source, pooling=plan.pooling, trust_pickle=plan.trust_pickle)
  sha256 = hf_text.files_sha256(imported.files)
  files = tokenizer_files(plan.source)
  config = imported.config
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(imported.variables["params"]))
  print(f"[import] {config.family} from {plan.source} (sha256 {sha256[:16]}): {count:,}"
        f" parameters, {config.num_layers} layers, hidden {config.hidden_size}, pooling"
        f" {imported.model.pooling}; tokenizer files:"
        f" {', '.join(n.split('/', 1)[1] for n in files) or 'none'}", flush=True)
  differences = _check_reference(imported, plan) if plan.reference else None
  record = text_record(plan, imported, sha256, differences, tokenizer=bool(files))
  written = convert.save_workdir(workdir, record, imported, files=files)
  state = "written" if written else "already there (the same import), left as it was"
  wrote = f"config.json, checkpoints/0{f' and {TOKENIZER_DIR}/' if files else ''}"
  print(f"[import] {workdir}: {wrote} {state}, in"
        f" {format_seconds(time.perf_counter() - start)}; evaluate it with --config.checkpoint="
        f"{workdir}", flush=True)
  return {"workdir": workdir, "record": record, "written": written, "differences": differences}
