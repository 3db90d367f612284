r"""Speed of the ImageNet training input pipeline on this machine, printed as one JSON object.

Writes an imagenet2012-format TFDS dataset of real-size synthetic JPEGs (sizes around 500x375,
photo-like content, about 70 KB per file where ImageNet's average about 110 KB; the tests' own
writer, tests/synthetic_data.py) into a temporary folder, then measures images/s of
nmjax.data.imagenet.train_iterator (read, JPEG decode, random-resized crop to 224, flip, batch)
with 0 (in this process), 1 and 2 grain worker processes (--workers), and the single-core cost of
decode + crop alone. Rates exclude worker start-up: they are taken between the first and the
last batch. "per_core" divides by the cores the workers can use (min(workers, CPU count)).

    .venv/bin/python benchmarks/input.py [--images 192] [--batch 32] [--batches 18] \
        [--workers 0,1,2]

The CPU may be shared with other work: the JSON records the load average before each
measurement, and figures taken under load are lower bounds.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from nmjax.data import imagenet

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import synthetic_data  # pylint: disable=g-import-not-at-top,wrong-import-position

_SIZES = ((500, 375), (375, 500), (500, 333), (453, 340), (500, 400), (400, 300))


def _pipeline_rate(records, *, batch: int, batches: int, workers: int) -> dict:
  labels = np.zeros(len(records), dtype=np.int64)
  epochs = -(-batches * batch // (len(records) // batch * batch))
  load = os.getloadavg()[0]
  start = time.perf_counter()
  iterator = imagenet.train_iterator(records, labels=labels, global_batch_size=batch, seed=0,
                                     num_epochs=epochs, image_size=224, num_workers=workers)
  next(iterator)
  first = time.perf_counter()
  for _ in range(batches - 1):
    next(iterator)
  end = time.perf_counter()
  iterator.close()
  rate = (batches - 1) * batch / (end - first)
  cores = min(max(workers, 1), os.cpu_count() or 1)
  return {"workers": workers, "images_per_s": round(rate, 1),
          "images_per_s_per_core": round(rate / cores, 1),
          "startup_s": round(first - start, 2), "load_average_before": round(load, 2)}


def _decode_crop_rate(records, count: int) -> dict:
  rng = np.random.default_rng(0)
  draws = rng.random((count, imagenet.DRAWS_PER_EXAMPLE))
  jpegs = [records[i % len(records)]["image"] for i in range(count)]
  start = time.perf_counter()
  for jpeg in jpegs:
    image = imagenet.decode(jpeg)
    image.load()
  decoded = time.perf_counter()
  for i, jpeg in enumerate(jpegs):
    imagenet.random_resized_crop(imagenet.decode(jpeg), draws[i], 224)
  end = time.perf_counter()
  return {"decode_ms": round((decoded - start) / count * 1e3, 2),
          "decode_and_crop_ms": round((end - decoded) / count * 1e3, 2),
          "images_per_s_one_core": round(count / (end - decoded), 1)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=192, help="synthetic JPEGs to write")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=18, help="batches timed per setting")
  parser.add_argument("--workers", default="0,1,2", help="worker counts to time")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    synthetic_data.write_imagenet(tmp, splits={"train": args.images}, sizes=_SIZES)
    write_s = time.perf_counter() - start
    records = imagenet.jpeg_records("imagenet2012", "train", data_dir=tmp)
    sizes_kb = [len(records[i]["image"]) / 1e3 for i in range(len(records))]
    results = {
        "machine": {"cpu_count": os.cpu_count()},
        "dataset": {"images": len(records), "mean_jpeg_kb": round(float(np.mean(sizes_kb)), 1),
                    "sizes": [list(s) for s in _SIZES], "write_s": round(write_s, 1)},
        "setting": {"image_size": 224, "batch": args.batch, "timed_batches": args.batches - 1},
        "decode_crop": _decode_crop_rate(records, 64),
        "pipeline": [_pipeline_rate(records, batch=args.batch, batches=args.batches, workers=w)
                     for w in map(int, args.workers.split(","))],
    }
  print(json.dumps(results))


if __name__ == "__main__":
  main()
