"""The task registry, probe splits carved from a split, and the deterministic corruptions."""

import numpy as np
import pytest

from nmjax import tasks
from nmjax.data import shifts, sources
from nmjax.errors import ConfigError, DataError


def test_registry_kinds_groups_and_paper_names():
  for task in tasks.TASKS.values():
    assert task.kind in tasks.KINDS and task.test
  assert tasks.GROUPS["embedded"] == ("fashion_mnist", "mnist", "digits", "mnist_to_digits",
                                      "digits_to_mnist", "fashion_mnist_c")
  assert {t.kind for t in tasks.resolve("embedded_id")} == {"id"}
  assert {t.kind for t in tasks.resolve("embedded_ood")} == {"ood", "far"}
  paper = {t.name for t in tasks.resolve("paper")}
  for name in ("cifar10", "cifar100", "oxford_flowers102", "food101", "oxford_iiit_pet",
               "cars196", "dtd", "caltech101", "eurosat", "patch_camelyon", "resisc45",
               "svhn_cropped", "stl10", "domainnet_real_to_sketch", "domainnet_sketch_to_clipart",
               "imagenet_to_imagenet_v2", "imagenet_to_imagenet_sketch",
               "imagenet_to_imagenet_r", "imagenet_to_imagenet_a"):
    assert name in paper
  assert tasks.TASKS["imagenet_to_imagenet_r"].logit_subset
  assert not tasks.TASKS["imagenet_to_imagenet_v2"].logit_subset
  # Order kept, duplicates dropped.
  assert [t.name for t in tasks.resolve("digits, mnist,digits")] == ["digits", "mnist"]


def test_task_names_are_shell_safe_and_the_older_arrow_names_still_resolve():
  assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789_/") for name in tasks.TASKS)
  assert tasks.ALIASES == {
      "mnist->digits": "mnist_to_digits", "digits->mnist": "digits_to_mnist",
      **{f"domainnet_{a}->{b}": f"domainnet_{a}_to_{b}" for a in ("real", "sketch")
         for b in ("real", "sketch", "painting", "clipart") if a != b},
      **{f"imagenet->imagenet_{s}": f"imagenet_to_imagenet_{s}" for s in ("v2", "sketch", "r",
                                                                          "a")}}
  # An older command's tasks, '+'-joined with arrows, name the same tasks in the same order.
  assert tasks.names("digits+mnist->digits,digits->mnist") == (
      "digits", "mnist_to_digits", "digits_to_mnist")
  assert tasks.resolve("mnist->digits") == tasks.resolve("mnist_to_digits")
  assert tasks.canonical(" imagenet->imagenet_r ") == "imagenet_to_imagenet_r"


def test_unknown_task_lists_the_known_ones():
  with pytest.raises(ConfigError) as error:
    tasks.resolve("mnist,cifar11")
  text = str(error.value)
  assert "'cifar11' is unknown" in text and "mnist_to_digits" in text and "embedded_ood" in text
  assert "\n" not in text
  with pytest.raises(ConfigError, match="empty"):
    tasks.resolve(" , ")


def test_fashion_mnist_probe_split_is_deterministic_disjoint_and_stratified():
  task = tasks.TASKS["fashion_mnist"]
  train, _ = tasks.split_records(task.train, image_shape=(28, 28, 1))
  test, _ = tasks.split_records(task.test[0], image_shape=(28, 28, 1))
  assert (len(train), len(test)) == (8000, 2000)
  train_index = {int(e["index"]) for e in train.__getitems__(range(len(train)))}
  test_index = {int(e["index"]) for e in test.__getitems__(range(len(test)))}
  assert not train_index & test_index and len(train_index | test_index) == 10_000
  test_labels = np.array([e["label"] for e in test.__getitems__(range(len(test)))])
  np.testing.assert_array_equal(np.bincount(test_labels), [200] * 10)
  again, _ = tasks.split_records(task.test[0], image_shape=(28, 28, 1))
  assert int(again[17]["index"]) == int(test[17]["index"])


def test_corruptions_are_deterministic_and_grow_with_severity():
  images = sources.get_source("mnist").load_arrays("test")[0][:20]
  for kind in shifts.CORRUPTIONS:
    distances = []
    for severity in shifts.SEVERITIES:
      name = f"{kind}_{severity}"
      out = np.stack([shifts.corrupt(im, name, i) for i, im in enumerate(images)])
      again = np.stack([shifts.corrupt(im, name, i) for i, im in enumerate(images)])
      assert out.dtype == np.uint8 and out.shape == images.shape
      np.testing.assert_array_equal(out, again)
      distances.append(np.abs(out.astype(float) - images).mean())
    assert distances[0] > 0, kind
    assert all(a < b for a, b in zip(distances, distances[1:])), (kind, distances)
  # The noise of an example depends on its index, not on where it sits in a batch.
  a = shifts.corrupt(images[0], "gaussian_noise_3", 7)
  b = shifts.corrupt(images[0], "gaussian_noise_3", 8)
  assert not np.array_equal(a, b)


def test_corruption_names_are_checked():
  assert shifts.parse("rotation_5") == ("rotation", 5)
  for bad in ("rotation_6", "fog_1", "blur", "blur_x"):
    with pytest.raises(ConfigError, match="unknown; allowed"):
      shifts.parse(bad)


def test_fashion_mnist_c_tests_four_corruptions_of_the_probe_test_images():
  task = tasks.TASKS["fashion_mnist_c"]
  assert [v.shift for v in task.test] == list(tasks.FMNIST_C_SHIFTS)
  assert task.train == tasks.TASKS["fashion_mnist"].train
  assert {(v.dataset, v.split, v.part) for v in task.test} == {
      ("fashion_mnist", "test", "probe_test")}
  single = tasks.TASKS["fashion_mnist_c/contrast_5"]
  assert [v.shift for v in single.test] == ["contrast_5"]


def test_fit_image_converts_size_and_channels():
  rgb = np.zeros((40, 60, 3), np.uint8)
  rgb[..., 0] = 200
  out = tasks.fit_image(rgb, (28, 28, 1))
  assert out.shape == (28, 28, 1) and out.dtype == np.uint8
  assert int(out[14, 14, 0]) == round(200 * 0.299)
  grey = np.full((28, 28, 1), 9, np.uint8)
  np.testing.assert_array_equal(tasks.fit_image(grey, (28, 28, 1)), grey)
  assert tasks.fit_image(grey, (32, 32, 3)).shape == (32, 32, 3)


def test_logit_subset_maps_test_classes_by_name():
  def info(name, classes):
    return sources.SourceInfo(name=name, num_classes=len(classes), image_shape=(8, 8, 3),
                              mean=(0.0,), std=(1.0,), flip_ok=True, splits={"test": 1},
                              class_names=tuple(classes))
  train = info("big", ["a", "b", "c", "d"])
  task = tasks.Task("t", "ood", tasks.Split("big", "train"), (tasks.Split("small", "test"),),
                    logit_subset=True)
  np.testing.assert_array_equal(tasks.label_map(train, info("small", ["d", "b"]), task), [3, 1])
  with pytest.raises(DataError, match="not classes of big"):
    tasks.label_map(train, info("small", ["z"]), task)
  plain = tasks.Task("p", "ood", tasks.Split("big", "train"), (tasks.Split("small", "test"),))
  assert tasks.label_map(train, info("same", ["w", "x", "y", "z"]), plain) is None
  with pytest.raises(DataError, match="has 2 classes"):
    tasks.label_map(train, info("small", ["d", "b"]), plain)


def test_study_tasks_probe_the_source_on_held_out_images_and_shift_whole_test_splits():
  """The embedded study's group: the source task apart from the downstream ones, trained on the
  train split's last HELD_OUT images (which the study's pre-training never reads) and tested on
  the whole test split; corruption shifts of Fashion-MNIST and MNIST on whole test splits; the
  far pair mnist<->digits as its own kind."""
  chosen = tasks.resolve("study")
  assert {t.name: t.kind for t in chosen} == {
      "fashion_mnist_source": "source", "mnist": "id", "digits": "id",
      "fashion_mnist_test_c": "ood", "mnist_c": "ood", "mnist_to_digits": "far",
      "digits_to_mnist": "far"}
  source = tasks.TASKS["fashion_mnist_source"]
  assert source.train == tasks.Split("fashion_mnist", "train", "held_out")
  assert source.test == (tasks.Split("fashion_mnist", "test"),)
  for name, dataset in (("fashion_mnist_test_c", "fashion_mnist"), ("mnist_c", "mnist")):
    task = tasks.TASKS[name]
    assert [(s.dataset, s.split, s.part, s.shift) for s in task.test] == [
        (dataset, "test", None, c) for c in tasks.STUDY_SHIFTS]
  labels = np.arange(60000) % 10
  held = tasks.part_indices(labels, "held_out")
  assert held[0] == 60000 - tasks.HELD_OUT and held[-1] == 59999 and len(held) == tasks.HELD_OUT
  with pytest.raises(DataError, match="held_out needs more than 5000 examples"):
    tasks.part_indices(labels[:4000], "held_out")
  probe = tasks.part_indices(labels, "probe_test")
  assert len(probe) == 12000 and not set(probe) & set(tasks.part_indices(labels, "probe_train"))
