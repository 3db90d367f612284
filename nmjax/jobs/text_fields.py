"""What the transfer and NMTune jobs read of a text encoder's config (configs/text_transfer.py):
the pooling, the tokens per example, and the text sets given as files (config.text_files) with
the tasks they declare. A config without these fields (an image encoder's) takes the defaults.
Validation code: it reads configs.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import ml_collections

from nmjax import io as nmjax_io, tasks as tasks_lib, text_features
from nmjax.data import text_sources
from nmjax.errors import ConfigError

# One declared set's fields (config.text_files.<name>.<field>), with what each means.
FILE_FIELDS = {
    "train": "a file to train on (an id task named like the set)",
    "test": "the file tested on ('' leaves the set out)",
    "train_task": "without a train file: the task whose train split the set is an ood test of",
    "text_field": "the field holding the text",
    "pair_field": "a pair task's second text ('' for single texts)",
    "label_field": "the field holding the label",
    "label_names": "the label set in class order, comma-separated",
}
_NAME = re.compile(r"[a-z0-9_]+")


def _file(where: str, path: str) -> str:
  """A declared file's absolute path, checked to exist with a known extension."""
  suffix = pathlib.PurePath(path).suffix.lower()
  if suffix not in text_sources.FORMATS:
    raise ConfigError(f"{where}={path} is not a text file nmjax reads; allowed extensions:"
                      f" {', '.join(text_sources.FORMATS)}")
  if not nmjax_io.isfile(path):
    raise ConfigError(f"{where}={path} does not exist (or is not a file); pass a jsonl, csv or"
                      " tsv file")
  return nmjax_io.absolute(path)


def check_file_task(name: str, entry: ml_collections.ConfigDict) -> tasks_lib.FileTask | None:
  """One declared set (config.text_files.<name>) as a FileTask, every field checked; None for a
  set given no file (declared by the config, left out by the run)."""
  where = f"config.text_files.{name}"
  unknown = sorted(set(entry.keys()) - set(FILE_FIELDS))
  if unknown:
    raise ConfigError(f"{where}.{unknown[0]} is not a field of a text set; allowed:"
                      f" {', '.join(FILE_FIELDS)}")
  fields = {k: str(entry[k]).strip() if k in entry else "" for k in FILE_FIELDS}
  if not fields["train"] and not fields["test"]:
    return None
  if not fields["test"]:
    raise ConfigError(f"{where}.test is empty; pass the file the set is tested on (jsonl, csv"
                      " or tsv)")
  if not _NAME.fullmatch(name):
    raise ConfigError(f"{where}: a set's name may hold a-z, 0-9 and _ only")
  if bool(fields["train"]) == bool(fields["train_task"]):
    raise ConfigError(f"{where} needs a train file ({where}.train) or the task whose train split"
                      f" it tests ({where}.train_task, e.g. glue_sst2), not both")
  for field in ("text_field", "label_field"):
    if not fields[field]:
      raise ConfigError(f"{where}.{field} is empty; name {FILE_FIELDS[field]}")
  labels = tuple(n.strip() for n in fields["label_names"].split(",") if n.strip())
  if len(labels) < 2 or len(set(labels)) != len(labels):
    raise ConfigError(f"{where}.label_names={fields['label_names']!r} is not allowed; allowed:"
                      " two or more distinct names, comma-separated, in class order")
  files = (("train", _file(f"{where}.train", fields["train"])),) if fields["train"] else ()
  files += (("test", _file(f"{where}.test", fields["test"])),)
  file_set = text_sources.FileSet(name, files, fields["text_field"], labels,
                                  pair_field=fields["pair_field"],
                                  label_field=fields["label_field"])
  return tasks_lib.FileTask(file_set, fields["train_task"])


def check_text_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A plan's text fields: pooling, max_length and the file tasks (sets with a test file).

  Args:
    config: a transfer or NMTune config; one without the fields takes their defaults.

  Returns:
    {"pooling", "max_length", "text_files"}: what TransferPlan and TuningPlan hold.

  Raises:
    ConfigError: one line naming the field and the allowed values.
  """
  pooling = str(config.pooling) if "pooling" in config else ""
  if pooling not in ("", *text_features.POOLINGS):
    raise ConfigError(f"config.pooling={pooling!r} is unknown; allowed: '' (the model's: cls for"
                      f" BERT and RoBERTa, last for GPT-2), {', '.join(text_features.POOLINGS)}")
  max_length = config.max_length if "max_length" in config else 128
  if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
    raise ConfigError(f"config.max_length={max_length!r} is out of range; allowed: an integer"
                      " >= 1 (at most the model's positions: 512 for BERT, 1024 for GPT-2)")
  declared = config.text_files if "text_files" in config else {}
  text_files = tuple(filter(None, (check_file_task(name, entry)
                                   for name, entry in declared.items())))
  tasks_lib.declared_tasks(text_files)  # Names and train tasks, before any work.
  return {"pooling": pooling, "max_length": max_length, "text_files": text_files}
