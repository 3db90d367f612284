"""The import job, configs/import.py: a PyTorch/safetensors checkpoint file becomes an nmjax
pre-training workdir (nmjax.convert), checked against a reference file when one is given.

A CLIP arch's workdir is a CLIP workdir: its config.json carries what
nmjax.train.pretrain_clip.build_model and source_info read (model, dtype, quick_gelu, loss,
context_length, image_size, dataset) and caption_noise (the reports' r), so nmjax.encoder
restores it as a CLIP encoder (image embeddings as features, the text tower for zero-shot)."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from nmjax import convert
from nmjax.config import check_range
from nmjax.convert import readers
from nmjax.errors import ConfigError, DataError
from nmjax.jobs import prepare_workdir
from nmjax.progress import format_seconds


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields before any work: the architecture, the file, the reference file."""
  convert.check_arch(config.arch)
  quick_gelu = config.get("quick_gelu")
  if convert.is_clip(config.arch):
    convert.clip_layouts.resolve_quick_gelu(config.arch, quick_gelu)
  elif quick_gelu is not None:
    raise ConfigError(f"config.quick_gelu is a CLIP option; config.arch={config.arch} takes"
                      " none (leave it unset)")
  readers.check_path(config.source)
  if config.reference and not os.path.isfile(config.reference):
    raise ConfigError(f"config.reference={config.reference} does not exist; pass an .npz with"
                      " inputs and logits and/or features, or leave it empty")
  check_range(config, "reference_tolerance", low=0.0, low_inclusive=False)
  unknown = sorted(set(config.input.keys()) - set(convert.INPUT_FIELDS))
  if unknown:
    raise ConfigError(f"config.input field {unknown[0]!r} is unknown; known:"
                      f" {', '.join(convert.INPUT_FIELDS)}")


def _check_reference(imported: convert.Imported, config: ml_collections.ConfigDict
                     ) -> dict[str, float]:
  differences = convert.compare(imported, config.reference)
  for output, difference in differences.items():
    print(f"[import] reference {config.reference}: {output} largest relative difference"
          f" {difference:.3g}", flush=True)
  worst = max(differences, key=differences.get)
  if differences[worst] > config.reference_tolerance:
    raise DataError(f"the imported model's {worst} differ from {config.reference} by"
                    f" {differences[worst]:.3g} (relative), more than"
                    f" config.reference_tolerance={config.reference_tolerance}: the file is not"
                    f" a {config.arch} as nmjax reads it, or the reference was made on another"
                    " input; nothing was written")
  return differences


def clip_fields(imported: convert.Imported, config: ml_collections.ConfigDict
                ) -> dict[str, Any]:
  """What a CLIP workdir's config.json says beyond an import's: the fields
  nmjax.train.pretrain_clip.build_model and source_info read, and the caption noise (the
  fraction of pairs pre-trained with another pair's caption: config.noise_ratio)."""
  return {"quick_gelu": bool(imported.spec.options["quick_gelu"]), "loss": "softmax",
          "context_length": int(imported.model.context_length),
          "image_size": int(imported.spec.image_size), "caption_noise": config.noise_ratio,
          "noise_type": "caption"}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Imports config.source into `workdir`; returns the workdir, its config record, whether
  anything was written, and the reference differences (None without a reference)."""
  start = time.perf_counter()
  validate(config)
  workdir = prepare_workdir(workdir)
  source = os.path.abspath(config.source)
  sha256 = convert.file_sha256(source)
  imported = convert.read(source, config.arch, trust_pickle=config.trust_pickle,
                          quick_gelu=config.get("quick_gelu"))
  model_input = convert.eval_input(imported, source, config.input.to_dict(),
                                   dataset=config.dataset)
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(imported.variables["params"]))
  what = (f"{'QuickGELU' if imported.spec.options['quick_gelu'] else 'exact GELU'}, image"
          f" features {imported.model.feature_dim}-d" if convert.is_clip(config.arch)
          else f"{imported.spec.num_classes} classes")
  print(f"[import] {config.arch} from {source} (sha256 {sha256[:16]}): {count:,} parameters,"
        f" {what}; evaluated at {model_input['image_size']}px, crop {model_input['crop_pct']},"
        f" {model_input['interpolation']}", flush=True)
  differences = _check_reference(imported, config) if config.reference else None
  record = {**config.to_dict(), "source": source, "source_sha256": sha256,
            "model": convert.check_arch(config.arch).model,
            "model_options": imported.spec.options, "num_classes": imported.spec.num_classes,
            "input": model_input, "dtype": "float32",
            "reference": os.path.abspath(config.reference) if config.reference else "",
            "reference_difference": differences}
  if convert.is_clip(config.arch):
    record.update(clip_fields(imported, config))
  written = convert.save_workdir(workdir, record, imported)
  state = "written" if written else "already there (the same import), left as it was"
  print(f"[import] {workdir}: config.json and checkpoints/0 {state}, in"
        f" {format_seconds(time.perf_counter() - start)}; evaluate it with --config.checkpoint="
        f"{workdir}", flush=True)
  return {"workdir": workdir, "record": record, "written": written, "differences": differences}
