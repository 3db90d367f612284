"""Text-classification sources: labelled texts (one text, or a pair) read from files or from a
prepared TFDS dataset, and the padded, masked token batches a text encoder's features are
extracted from.

A source's `info` (TextInfo) says what an evaluation needs (classes and their names, the
splits, the text fields) and `split(name)` gives a TextSplit: the texts (and second texts of a
pair task) with int64 labels, in the order of the split. Two kinds:

  files     FileSet: one file per split, jsonl (one JSON object a line), csv or tsv (a header
            line naming the fields), chosen by the file's extension; text_field (and pair_field
            for a pair task) name the texts, label_field the label. A label is a name of the
            declared label set (its position is the class) or the class index itself (an int, or
            digits in csv/tsv). A missing field, a label outside the label set, an empty text or
            an unreadable file fails with one line naming the file, the line and the field.
            Names "files/<set name>"; such sets are declared by a job's config.
  TFDS      any TFDS text-classification dataset prepared as array_record under
            <data_dir>/tfds (GLUE's configs: glue/sst2, glue/mnli, ...), read with tfds' data
            sources, without TensorFlow: tfds.features.Text decodes to UTF-8 bytes in numpy.
            Nothing is downloaded; a dataset that is not there names the command preparing it.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import pathlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from nmjax import io as nmjax_io
from nmjax.data import locations, records
from nmjax.errors import ConfigError, DataError

FILE_PREFIX = "files/"   # Dataset names of declared file sets: files/<set name>.
FORMATS = {".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv"}
# The text fields of GLUE's classification configs in TFDS (a pair's first text first).
GLUE_FIELDS = {
    "sst2": ("sentence",), "cola": ("sentence",), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
    "mrpc": ("sentence1", "sentence2"), "qqp": ("question1", "question2"),
    "wnli": ("sentence1", "sentence2"),
}
_READ_CHUNK = 4096
_IMAGE_SETS = ("digits", "fashion_mnist", "mnist")


@dataclasses.dataclass(frozen=True)
class TextInfo:
  """What an evaluation needs to know about a text-classification dataset.

  digest: a file set's content digest (its files' bytes, fields and label names; features are
  cached under it, so an edited file is encoded again); empty for a TFDS dataset.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  splits: tuple[str, ...]
  text_fields: tuple[str, ...]   # one field, or two for a pair task
  digest: str = ""


@dataclasses.dataclass(frozen=True)
class TextSplit:
  """The examples of one split, in order: texts, the second texts of a pair task (None for
  single-text tasks) and int64 labels (N,)."""
  texts: tuple[str, ...]
  pairs: tuple[str, ...] | None
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.texts)

  def take(self, positions: Sequence[int]) -> TextSplit:
    """The examples at `positions`, in that order."""
    rows = [int(p) for p in positions]
    return TextSplit(tuple(self.texts[r] for r in rows),
                     None if self.pairs is None else tuple(self.pairs[r] for r in rows),
                     self.labels[np.asarray(rows, np.int64)])


@dataclasses.dataclass(frozen=True)
class FileSet:
  """A text-classification set given as files (what a job's config.text_files declares).

  Attributes:
    name: the set's name (its dataset is files/<name>).
    files: (split, path) pairs, e.g. (("train", "a.jsonl"), ("test", "b.tsv")).
    text_field: the field holding the text (a pair task's first text).
    pair_field: a pair task's second text; empty for single-text tasks.
    label_field: the field holding the label.
    label_names: the label set, in class order.
  """
  name: str
  files: tuple[tuple[str, str], ...]
  text_field: str
  label_names: tuple[str, ...]
  pair_field: str = ""
  label_field: str = "label"

  @property
  def text_fields(self) -> tuple[str, ...]:
    return (self.text_field, self.pair_field) if self.pair_field else (self.text_field,)


class TextSource:
  """A dataset of labelled texts: `info` and each split (read once, then kept)."""

  def __init__(self, info: TextInfo, read: Callable[[str], TextSplit]):
    self.info = info
    self._read = read
    self._splits: dict[str, TextSplit] = {}
    self._lock = threading.Lock()

  def split(self, name: str) -> TextSplit:
    """The split's examples, in order."""
    if name not in self.info.splits:
      raise ConfigError(f"split={name!r} is not a split of dataset {self.info.name!r}; splits:"
                        f" {', '.join(self.info.splits)}")
    with self._lock:
      if name not in self._splits:
        self._splits[name] = self._read(name)
      return self._splits[name]


# ----------------------------------------------------------------------------------------------
# Files.

def _rows(path: str, text: str) -> Iterator[tuple[int, Mapping[str, Any]]]:
  """(line number, fields) of each example of a jsonl, csv or tsv file's text."""
  kind = FORMATS.get(pathlib.PurePath(path).suffix.lower())
  if kind is None:
    raise DataError(f"text file {path}: unknown format; allowed extensions:"
                    f" {', '.join(FORMATS)}")
  if kind == "jsonl":
    for number, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        fields = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"text file {path} line {number}: not valid JSON ({e.msg})") from None
      if not isinstance(fields, dict):
        raise DataError(f"text file {path} line {number}: not a JSON object")
      yield number, fields
    return
  # TSV as GLUE writes it: tabs only, quote characters are text.
  options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {}
  reader = csv.DictReader(io.StringIO(text, newline=""), **options)
  try:
    for fields in reader:
      yield reader.line_num, fields
  except csv.Error as e:
    raise DataError(f"text file {path} line {reader.line_num}: cannot be read as"
                    f" {kind} ({e})") from None


def _field(path: str, number: int, fields: Mapping[str, Any], name: str) -> Any:
  """A line's field, or a DataError naming the file, the line, the field and those present."""
  value = fields.get(name)
  if value is None:
    present = ", ".join(str(k) for k in fields if k is not None) or "none"
    raise DataError(f"text file {path} line {number}: field {name!r} is missing (fields:"
                    f" {present})")
  return value


def _text(path: str, number: int, fields: Mapping[str, Any], name: str) -> str:
  """A line's text field, checked to be a non-blank string."""
  value = _field(path, number, fields, name)
  if not isinstance(value, str):
    raise DataError(f"text file {path} line {number} field {name!r}: not a text"
                    f" ({type(value).__name__})")
  if not value.strip():
    raise DataError(f"text file {path} line {number} field {name!r}: empty text")
  return value


def label_index(value: Any, names: Sequence[str]) -> int | None:
  """The class of a label value: its position in `names` when it is one of them, else the
  value itself when it is a class index (an int, or a string of digits); None otherwise."""
  if isinstance(value, str):
    if value in names:
      return names.index(value)
    value = int(value.strip()) if value.strip().isdigit() else None
  elif isinstance(value, float) and value.is_integer():
    value = int(value)
  if isinstance(value, bool) or not isinstance(value, int):
    return None
  return value if 0 <= value < len(names) else None


def read_file(path: str, file_set: FileSet) -> TextSplit:
  """The examples of one file of a file set, checked (one-line DataErrors name the file, the
  line and the field)."""
  try:
    text = nmjax_io.read_bytes(path).decode("utf-8-sig")
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"text file {path} cannot be read ({type(e).__name__}:"
                    f" {(str(e).splitlines() or [''])[0][:160]})") from None
  texts, pairs, labels = [], [], []
  for number, fields in _rows(path, text):
    texts.append(_text(path, number, fields, file_set.text_field))
    if file_set.pair_field:
      pairs.append(_text(path, number, fields, file_set.pair_field))
    value = _field(path, number, fields, file_set.label_field)
    label = label_index(value, file_set.label_names)
    if label is None:
      raise DataError(f"text file {path} line {number} field {file_set.label_field!r}: label"
                      f" {value!r} is not in the label set ({', '.join(file_set.label_names)})"
                      " (a name of the set, or its index)")
    labels.append(label)
  if not texts:
    raise DataError(f"text file {path} holds no examples")
  return TextSplit(tuple(texts), tuple(pairs) if file_set.pair_field else None,
                   np.asarray(labels, np.int64))


def file_digest(file_set: FileSet) -> str:
  """Short sha256 of a file set's files (their bytes), fields and label names."""
  digest = hashlib.sha256(json.dumps(dataclasses.asdict(file_set), sort_keys=True).encode())
  for _, path in file_set.files:
    try:
      digest.update(nmjax_io.read_bytes(path))
    except OSError as e:
      raise DataError(f"text file {path} cannot be read ({type(e).__name__}:"
                      f" {e.strerror or e})") from None
  return digest.hexdigest()[:16]


def file_source(file_set: FileSet) -> TextSource:
  """The source of a declared file set (its files are read when a split is first asked for)."""
  info = TextInfo(name=f"{FILE_PREFIX}{file_set.name}", num_classes=len(file_set.label_names),
                  class_names=tuple(file_set.label_names),
                  splits=tuple(split for split, _ in file_set.files),
                  text_fields=file_set.text_fields, digest=file_digest(file_set))
  paths = dict(file_set.files)
  return TextSource(info, lambda split: read_file(paths[split], file_set))


# ----------------------------------------------------------------------------------------------
# TFDS.

def _decoded(value: Any) -> str:
  """A TFDS Text value (UTF-8 bytes without TensorFlow) as a str."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _tfds_fields(name: str, builder: Any) -> tuple[tuple[str, ...], str]:
  """(the text fields, the label field) of a TFDS dataset: GLUE's by config, else its one Text
  feature and its one ClassLabel."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = builder.info.features
  texts = [k for k, f in features.items() if isinstance(f, tfds.features.Text)]
  labels = [k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)]
  config = name.split(":")[0].split("/")[-1]
  fields = GLUE_FIELDS.get(config) if name.startswith("glue/") else None
  if fields is None and len(texts) == 1:
    fields = tuple(texts)
  label = "label" if "label" in labels else (labels[0] if len(labels) == 1 else None)
  if not fields or not set(fields) <= set(texts) or label is None:
    raise DataError(f"TFDS dataset {name!r} in {builder.data_dir} is not a text-classification"
                    f" dataset nmjax reads (text features: {', '.join(texts) or 'none'};"
                    f" class labels: {', '.join(labels) or 'none'}); choose another task")
  return fields, label


def _tfds_split(name: str, builder: Any, fields: tuple[str, ...], label_key: str,
                split: str) -> TextSplit:
  """Every record of a TFDS split, in record order (read in chunks, texts decoded)."""
  source = builder.as_data_source(split)
  columns: list[list[str]] = [[] for _ in fields]
  labels = []
  for start in range(0, len(source), _READ_CHUNK):
    for record in records.read_many(source, range(start, min(start + _READ_CHUNK, len(source)))):
      for column, field in zip(columns, fields):
        column.append(_decoded(record[field]))
      labels.append(int(record[label_key]))
  labels = np.asarray(labels, np.int64)
  if labels.size and labels.min() < 0:
    row = int(np.flatnonzero(labels < 0)[0])
    raise DataError(f"TFDS dataset {name!r} split {split!r} has no labels (label"
                    f" {labels[row]} in record {row}; GLUE's test splits are unlabelled): test"
                    " on its validation split")
  return TextSplit(tuple(columns[0]), tuple(columns[1]) if len(fields) > 1 else None, labels)


@functools.cache
def _tfds_source(name: str, tfds_dir: pathlib.Path | str) -> TextSource:
  build = (f"prepare it on a machine with internet: tfds build {name} --data_dir={tfds_dir}"
           " --file_format=array_record")
  not_there = DataError(f"TFDS dataset {name!r} is not prepared in {tfds_dir}; {build}")
  builder = locations.prepared_builder(name, tfds_dir, unknown=not_there)
  fields, label_key = _tfds_fields(name, builder)
  label = builder.info.features[label_key]
  info = TextInfo(name=name, num_classes=label.num_classes, class_names=tuple(label.names),
                  splits=tuple(builder.info.splits), text_fields=fields)
  return TextSource(info, functools.partial(_tfds_split, name, builder, fields, label_key))


def get_source(name: str, *, data_dir: str | os.PathLike | None = None,
               file_sets: Mapping[str, FileSet] | None = None) -> TextSource:
  """The text source called `name`: a declared file set (files/<set name>) or a TFDS dataset
  prepared as array_record under <data_dir>/tfds (nmjax.data.sources.data_root's rule).

  Args:
    name: files/<set name>, or a TFDS name such as glue/sst2.
    data_dir: the data root (None: $NMJAX_DATA_DIR or ~/.cache/nmjax).
    file_sets: the declared file sets by name.

  Returns:
    The TextSource (a TFDS one is cached per name and location).

  Raises:
    ConfigError: an image dataset's name or an undeclared file set.
    DataError: a dataset that is not prepared (naming the command), not text, or unreadable.
  """
  if name.startswith(FILE_PREFIX):
    declared = dict(file_sets or {})
    set_name = name[len(FILE_PREFIX):]
    if set_name not in declared:
      raise ConfigError(f"text set {set_name!r} is not declared; declared:"
                        f" {', '.join(declared) or 'none'} (config.text_files)")
    return file_source(declared[set_name])
  if name in _IMAGE_SETS:
    raise ConfigError(f"dataset {name!r} holds images; a text encoder reads text tasks")
  return _tfds_source(name, locations.under(locations.data_root(data_dir), "tfds"))


def token_batches(split: TextSplit, tokenize: Callable[..., tuple[np.ndarray, ...]], *,
                  batch_size: int, max_length: int, pad_id: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """This process's eval batches of a text split, in order, tokenized as they are read.

  Global batch k holds positions [k*batch_size, (k+1)*batch_size); process p takes its slice
  [p*b, (p+1)*b), b = batch_size // process_count, so every process yields the same number of
  batches and, over all processes, every example appears once with mask True.

  Args:
    split: the examples.
    tokenize: tokenize(texts, pairs) -> (ids, attention mask, token types), each (n, L) with
      L <= max_length.
    batch_size: the global batch size (divisible by process_count).
    max_length: token positions of every batch (shorter tokenizations are padded).
    pad_id: the token id of padding positions.
    process_index: this process.
    process_count: the processes.

  Yields:
    {"ids", "attention_mask", "token_types": int32 (b, max_length), "label": int32 (b,),
    "mask": bool (b,), False on padding rows}.
  """
  host = batch_size // process_count
  for start in range(0, len(split), batch_size):
    positions = np.arange(host) + start + process_index * host
    mask = positions < len(split)
    batch = {"ids": np.full((host, max_length), pad_id, np.int32),
             "attention_mask": np.zeros((host, max_length), np.int32),
             "token_types": np.zeros((host, max_length), np.int32),
             "label": np.zeros(host, np.int32), "mask": mask}
    if mask.any():
      part = split.take(positions[mask])
      tokens = tokenize(list(part.texts), None if part.pairs is None else list(part.pairs))
      for key, values in zip(("ids", "attention_mask", "token_types"), tokens):
        values = np.asarray(values)[:, :max_length]
        batch[key][mask, :values.shape[1]] = values
      batch["label"][mask] = part.labels
    yield batch
