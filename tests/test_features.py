"""nmjax.features: masked extraction of every example once on any mesh, and features files."""

import gc
import os

import jax
import numpy as np
import pytest

from nmjax import encoder as encoder_lib, features, models, parallel
from nmjax.data import pipeline, sources
from nmjax.data.records import ArrayRecords
from nmjax.errors import DataError
from nmjax.train.steps import normalize


@pytest.fixture(scope="module")
def encoder():
  """A randomly initialised small ResNet in inference mode over the first 203 digits test images."""
  source = sources.get_source("digits")
  records = source.data_source("test")
  images = np.stack([records[i]["image"] for i in range(203)])
  labels = source.labels("test")[:203]
  model = models.get_model("resnet_small", num_classes=10)
  with jax.threefry_partitionable(False):  # XLA:CPU compiles this init much faster.
    variables = jax.jit(lambda: model.init(jax.random.key(0), images[:1].astype(np.float32),
                                           train=False))()
  info = source.info

  def apply_fn(variables, batch_images):
    return model.apply(variables, normalize(batch_images, info.mean, info.std), train=False)[1]

  return apply_fn, variables, ArrayRecords(images, labels), images, labels


def test_extract_covers_every_example_once_on_1_and_8_devices(encoder):
  apply_fn, variables, records, images, labels = encoder
  expected = np.asarray(jax.jit(apply_fn)(variables, images))
  assert len(jax.devices()) == 8
  results = {}
  for devices in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    # 203 = 3 full batches of 64 + 11 real rows in a padded last batch.
    batches = pipeline.eval_batches(records, batch_size=64)
    values, got_labels = features.extract(apply_fn, variables, batches, mesh=mesh)
    assert values.shape == (203, models.feature_dim("resnet_small"))
    assert values.dtype == np.float32
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-5)
    results[devices] = values
  np.testing.assert_allclose(results[1], results[8], rtol=1e-5, atol=1e-6)


def test_extract_over_two_processes_slices_recombines_to_the_whole(encoder):
  """Each process's eval slices, stitched in global order, are exactly the dataset once."""
  apply_fn, variables, records, images, _ = encoder
  mesh = parallel.make_mesh(jax.devices()[:1])
  parts = [features.extract(apply_fn, variables,
                            pipeline.eval_batches(records, batch_size=64, process_index=p,
                                                  process_count=2), mesh=mesh)[0]
           for p in range(2)]
  # Global batch k is process 0's 32 rows then process 1's 32 rows.
  stitched, offsets = [], [0, 0]
  for step in range(pipeline.num_eval_steps(203, 64)):
    for p in range(2):
      real = max(0, min(32, 203 - (step * 64 + p * 32)))
      stitched.append(parts[p][offsets[p]:offsets[p] + real])
      offsets[p] += real
  np.testing.assert_allclose(np.concatenate(stitched), jax.jit(apply_fn)(variables, images),
                             rtol=1e-5, atol=1e-5)



def test_extract_traces_once_per_function_and_forgets_a_dead_one():
  traced = []

  def apply_fn(w, images):
    traced.append(images.shape)  # Python runs at trace time only.
    return images.reshape(len(images), -1) @ w

  batch = {"image": np.ones((8, 2, 2, 1), np.float32), "label": np.arange(8),
           "mask": np.arange(8) < 5}
  mesh = parallel.make_mesh(jax.devices()[:1])
  for scale in (1.0, 2.0, 3.0):  # Other variables, one trace: a study's encoders of one model.
    values, _ = features.extract(apply_fn, np.full((4, 3), scale, np.float32), [batch], mesh=mesh)
    np.testing.assert_array_equal(values, np.full((5, 3), 4 * scale, np.float32))
  assert len(traced) == 1
  before = len(features._JITTED)  # pylint: disable=protected-access
  del apply_fn
  gc.collect()
  assert len(features._JITTED) == before - 1  # pylint: disable=protected-access

  class Slotted:  # No weak references to it: extracted with a step of its own each call.
    __slots__ = ()

    def __call__(self, w, images):
      return images.reshape(len(images), -1) @ w

  values, _ = features.extract(Slotted(), np.ones((4, 3), np.float32), [batch], mesh=mesh)
  np.testing.assert_array_equal(values, np.full((5, 3), 4.0, np.float32))

def test_features_file_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  values = rng.normal(size=(12, 5))
  labels = np.arange(12) % 4
  path = features.save(tmp_path / "f.npz", values, labels, clean_labels=labels, domain="x/test")
  loaded = features.load(path, num_classes=4, feature_dim=5)
  assert loaded.features.dtype == np.float32 and loaded.labels.dtype == np.int64
  np.testing.assert_allclose(loaded.features, values.astype(np.float32))
  np.testing.assert_array_equal(loaded.clean_labels, labels)
  assert loaded.domain == "x/test" and loaded.path == str(path)
  assert not [p for p in os.listdir(tmp_path) if "tmp" in p]


def _write(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


@pytest.mark.parametrize("arrays, kwargs, message", [
    (dict(features=np.array([[0.0, np.nan], [1.0, 2.0]]), labels=np.array([0, 1])), {},
     "non-finite"),
    (dict(features=np.ones((2, 3)), labels=np.array([0, 1])), dict(feature_dim=4),
     "feature dimension 3 != expected 4"),
    (dict(features=np.ones((2, 3)), labels=np.array([0, 5])), dict(num_classes=3),
     "labels outside [0, 3)"),
    (dict(features=np.ones((2, 3)), labels=np.array([-1, 0])), {}, "labels outside"),
    (dict(features=np.ones((2, 3)), labels=np.array([0, 1, 1])), {}, "shape (2,)"),
    (dict(features=np.ones(3), labels=np.array([0, 1, 1])), {}, "2-D"),
    (dict(labels=np.array([0, 1])), {}, "no features"),
])
def test_bad_features_files_are_refused_naming_the_file(tmp_path, arrays, kwargs, message):
  path = _write(tmp_path / "bad.npz", **arrays)
  with pytest.raises(DataError) as error:
    features.load(path, **kwargs)
  text = str(error.value)
  assert "\n" not in text and path in text and message in text, text


def test_missing_or_unreadable_file(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    features.load(tmp_path / "none.npz")
  (tmp_path / "text.npz").write_text("not an npz")
  with pytest.raises(DataError, match="cannot be read"):
    features.load(tmp_path / "text.npz")


def test_as_feature_set_validates_arrays_under_the_given_name():
  good = features.as_feature_set((np.ones((3, 2)), [0, 1, 2]), name="train")
  assert good.num_examples == 3 and good.feature_dim == 2
  with pytest.raises(DataError, match="^train: features hold 1 non-finite"):
    features.as_feature_set((np.array([[np.inf, 0.0]]), [0]), name="train")
  with pytest.raises(DataError, match="expected a features file path"):
    features.as_feature_set(42, name="test")


def test_encoders_of_one_architecture_share_one_feature_function(checkpoint):
  # What lets a study's runs (same model, other weights) share one compiled feature step.
  older, newest = encoder_lib.load(checkpoint, step=10), encoder_lib.load(checkpoint)
  assert older.step == 10 and newest.step == 12 and older.encode is newest.encode
