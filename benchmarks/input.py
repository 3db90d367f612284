r"""Speed of the ImageNet training input on this machine, old and new paths side by side, as JSON.

Writes an imagenet2012-format TFDS dataset of synthetic JPEGs the size of ImageNet's (a mix of
its common sizes averaging about 470x395 pixels; 1/f-spectrum colour texture plus noise, which
compresses like photographs: about 110 KB at quality 90, ImageNet's average) into a temporary
folder, then measures, on the same JPEGs and the same draws:
  * "pipeline": nmjax.data.imagenet.train_iterator end to end (record read, grain stream, JPEG
    decode, random-resized crop to 224, flip, batch; 0 = in this process, 1 and 2 grain worker
    processes; and --threads_in_process rows: 0 workers, that many grain read threads decoding
    in this process, where Pillow's decode and nmjax's resize run outside the GIL), "old" =
    decode_less=False over jpeg_records(batched_reads=True): every JPEG
    opened and decoded whole by Pillow, records read in batches through TFDS's parser, the
    previous path; "new" = the defaults (single reads, only the rows each crop needs
    decoded, at a reduced DCT scale where the crop allows, and only its columns and rows,
    resized into the batch by nmjax.data.resample: Pillow's pixels in about half its CPU);
  * "transform": decode + crop + flip alone in this process (old: Pillow's whole decode; new:
    decode_less), on these JPEGs and on larger ones (1024x768 and 800x600), where reduced-scale
    decoding applies to most crops;
  * "profile": the cost of each stage per image, in CPU milliseconds;
  * "quality": how often a reduced-scale decode applies, the fraction of rows decoded, and how
    far reduced crops are from full-decode ones (mean absolute difference, grey levels of 255).
The dataset is written by tests/synthetic_data.write_imagenet with photo_jpeg in place of its
own generator (whose smaller files decode faster than ImageNet's). The records are indexed as a
1,281,167-example dataset (position i reads JPEG i % images), so grain's shuffle costs what it
does on ImageNet: over a few hundred records the stream costs about 0.1 ms more per example
(5x; "profile": stream_over_256_examples).

Per core: images per CPU-second, i.e. images/s divided by the cores actually used, where the
cores used are the CPU seconds of this process and its worker processes (/proc/<pid>/stat, user
+ system) over the timed span, divided by its wall-clock length. The CPU is shared with other
work, which lowers images/s (reported too, with the load average) far more than images per
CPU-second. Old and new alternate within each round; figures are medians over --rounds, and
new_over_old_per_core is the median of the rounds' new/old ratios (steadier than either figure
when other work shares the CPU). Rates start after warm-up batches (worker start-up, then the
prefetch buffers drained).
The headline old_/new_images_per_sec_per_core come from the pipeline with one worker process
(--headline_workers): one core's work plus the hand-off to the training process, which is what
a host with data_workers = cores - 4 gets per worker. With two workers on this 2-core machine the
workers, the training process and the other work on the machine oversubscribe the cores, and
their CPU-seconds per image rise with it; that row is reported too.

The JSON is also written, with the command, commit, date and machine, to
docs/benchmarks/input-<device>.json (--out to choose the file); <device> is jax's default device
(the host's CPU figures of an accelerator machine go under the accelerator's name).

    .venv/bin/python benchmarks/input.py [--images 256] [--batch 32] [--batches 20] \
        [--workers 0,1,2] [--threads_in_process 2] [--rounds 3] [--headline_workers 1]
"""

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from unittest import mock

import numpy as np
from PIL import Image

import provenance  # benchmarks/provenance.py
from nmjax.data import imagenet, pipeline, records, resample

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import synthetic_data  # pylint: disable=g-import-not-at-top,wrong-import-position

# Common ImageNet sizes (Flickr's 500-pixel side dominates), mean about 470x395.
_SIZES = ((500, 375), (375, 500), (500, 333), (453, 340), (500, 400), (400, 300), (640, 480),
          (333, 500))
_LARGE_SIZES = ((1024, 768), (800, 600), (768, 1024))
_IMAGENET_EXAMPLES = 1_281_167
_OUTPUT = 224


def photo_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
  """A photo-like JPEG: colour texture with a 1/f amplitude spectrum (as natural images have)
  and mild sensor-like noise; about 110 KB at 470x390 and quality 90, as ImageNet's average."""
  fy = np.fft.fftfreq(height)[:, None]
  fx = np.fft.rfftfreq(width)[None, :]
  radius = np.hypot(fx, fy)
  radius[0, 0] = 1.0
  amplitude = radius ** -1.05
  amplitude[0, 0] = 0.0
  shape = (3, height, width // 2 + 1)
  spectrum = rng.normal(size=shape) + 1j * rng.normal(size=shape)
  mixing = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.5, 0.6]])  # correlated channels
  texture = np.fft.irfft2(np.einsum("ij,jhw->ihw", mixing, spectrum) * amplitude,
                          s=(height, width))
  pixels = (texture / texture.std() * 45 + rng.uniform(80, 170, (3, 1, 1))).transpose(1, 2, 0)
  pixels += rng.normal(0, 4, pixels.shape)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG",
                                                                   quality=quality)
  return buffer.getvalue()


def _children(pid: int) -> list[int]:
  found = []
  for task in os.listdir(f"/proc/{pid}/task"):
    with open(f"/proc/{pid}/task/{task}/children") as f:
      found += [int(c) for c in f.read().split()]
  return found


def _process_tree() -> list[int]:
  """This process and its live descendants (grain's workers)."""
  tree, pending = [], [os.getpid()]
  while pending:
    pid = pending.pop()
    tree.append(pid)
    try:
      pending += _children(pid)
    except OSError:
      pass
  return tree


def _cpu_seconds(pids: list[int]) -> float:
  """User + system CPU seconds of this process (exact) and the other given processes (in clock
  ticks; those that exited count no more)."""
  tick = os.sysconf("SC_CLK_TCK")
  total = time.process_time()
  for pid in pids:
    if pid == os.getpid():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    total += (int(fields[11]) + int(fields[12])) / tick
  return total


def _timed_pipeline(source, *, decode_less: bool, batch: int, batches: int, workers: int,
                    threads: int) -> dict:
  labels = np.zeros(len(source), dtype=np.int64)
  iterator = imagenet.train_iterator(source, labels=labels, global_batch_size=batch, seed=0,
                                     image_size=_OUTPUT, num_workers=workers,
                                     num_threads=threads, decode_less=decode_less)
  for _ in range(2 + 2 * workers):  # start-up, then what the workers buffered meanwhile
    next(iterator)
  pids = _process_tree()  # this process and its workers
  load = os.getloadavg()[0]
  cpu, own, start = _cpu_seconds(pids), time.process_time(), time.perf_counter()
  for _ in range(batches):
    next(iterator)
  wall, cpu = time.perf_counter() - start, _cpu_seconds(pids) - cpu
  own = time.process_time() - own
  iterator.close()
  images = batches * batch
  return {"images_per_s": images / wall, "images_per_cpu_s": images / cpu,
          "cores_used": cpu / wall, "load_average_before": load,
          "main_process_cpu_ms_per_image": own / images * 1e3}


def _pipelines(old_source, new_source, args) -> list[dict]:
  results = []
  settings = [(int(w), 1) for w in args.workers.split(",") if w]
  settings += [(0, int(t)) for t in args.threads_in_process.split(",") if t]
  for workers, threads in settings:
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
      for name, source, decode_less in (("old", old_source, False), ("new", new_source, True)):
        runs[name].append(_timed_pipeline(source, decode_less=decode_less, batch=args.batch,
                                          batches=args.batches, workers=workers,
                                          threads=threads))
    # Old and new ran back to back in each round: their ratio is steadier than either figure
    # on a shared machine.
    paired = [n["images_per_cpu_s"] / o["images_per_cpu_s"]
              for o, n in zip(runs["old"], runs["new"])]
    row = {"workers": workers, "threads": threads,
           "new_over_old_per_core": round(float(np.median(paired)), 3)}
    for name, rounds in runs.items():
      row[name] = {
          "images_per_s": round(float(np.median([r["images_per_s"] for r in rounds])), 1),
          "images_per_sec_per_core": round(
              float(np.median([r["images_per_cpu_s"] for r in rounds])), 1),
          "cores_used": round(float(np.median([r["cores_used"] for r in rounds])), 2),
          # With workers: the hand-off (grain's queue, shared memory, WorkerBatches' copy).
          "main_process_cpu_ms_per_image": round(float(np.median(
              [r["main_process_cpu_ms_per_image"] for r in rounds])), 3),
          "per_round_per_core": [round(r["images_per_cpu_s"], 1) for r in rounds],
          "load_average_before": [round(r["load_average_before"], 2) for r in rounds]}
    results.append(row)
  return results


def _cpu_ms(fn, count: int, rounds: int) -> float:
  """Median CPU milliseconds per call of fn(i) over i < count (all threads of this process:
  array_record reads in a thread pool)."""
  per_round = []
  for _ in range(rounds):
    start = time.process_time()
    for i in range(count):
      fn(i)
    per_round.append((time.process_time() - start) / count * 1e3)
  return float(np.median(per_round))


def _transform(jpegs: list[bytes], draws: np.ndarray, rounds: int) -> dict:
  """Decode + crop + flip alone, in CPU ms per image, old and new alternating."""
  times = {"old": [], "new": []}
  for _ in range(rounds):
    for name, decode_less in (("old", False), ("new", True)):
      times[name].append(_cpu_ms(lambda i, d=decode_less: imagenet.random_resized_crop(
          jpegs[i], draws[i], _OUTPUT, decode_less=d), len(jpegs), 1))
  old_ms, new_ms = float(np.median(times["old"])), float(np.median(times["new"]))
  return {"old_ms": round(old_ms, 3), "new_ms": round(new_ms, 3),
          "old_images_per_cpu_s": round(1e3 / old_ms, 1),
          "new_images_per_cpu_s": round(1e3 / new_ms, 1)}


def _decode_plan(jpeg: bytes, uniforms: np.ndarray) -> tuple:
  """What the new path decodes for this crop: (frame, box, DCT scale, original rows)."""
  frame = imagenet.jpeg_frame(jpeg)
  box = imagenet.crop_box(frame.width, frame.height, uniforms)
  scale = imagenet.dct_scale(box, _OUTPUT)
  reduced = tuple(v / scale for v in box)
  rows = imagenet.resize_rows(-(-frame.width // scale), -(-frame.height // scale), reduced,
                              _OUTPUT) * scale
  return frame, box, scale, min(rows, frame.height) if frame.one_scan else frame.height


def _quality(jpegs: list[bytes], draws: np.ndarray) -> dict:
  scales, rows, diffs = [], [], []
  for jpeg, uniforms in zip(jpegs, draws):
    frame, _, scale, decoded_rows = _decode_plan(jpeg, uniforms)
    scales.append(scale)
    rows.append(decoded_rows / frame.height)
    if scale > 1:
      new, old = (imagenet.random_resized_crop(jpeg, uniforms, _OUTPUT, decode_less=d).astype(
          np.int16) for d in (True, False))
      diffs.append(float(np.abs(new - old).mean()))
  counts = np.bincount(scales, minlength=9)
  return {"crops": len(jpegs), "decoded_at": {f"1/{s}": int(counts[s]) for s in (1, 2, 4, 8)},
          "mean_fraction_of_rows_decoded": round(float(np.mean(rows)), 3),
          "reduced_mean_abs_diff": {"mean": round(float(np.mean(diffs)), 2) if diffs else None,
                                    "max": round(max(diffs), 2) if diffs else None}}


def _profile(jpegs: list[bytes], draws: np.ndarray, old_source, new_source, args) -> dict:
  """CPU ms per image of each stage, old (Pillow: open, decode whole) and new (jpeg_frame,
  decode_rows) on the same JPEGs and draws."""
  count, rounds = len(jpegs), args.rounds
  plans = [_decode_plan(j, d) for j, d in zip(jpegs, draws)]
  full = [imagenet.decode(j) for j in jpegs]
  for image in full:
    image.load()
  crops = [im.resize((_OUTPUT, _OUTPUT), Image.Resampling.BILINEAR, box=plan[1])
           for im, plan in zip(full, plans)]

  def decode_at(scale: int) -> float:
    def decode(i: int) -> None:
      frame = plans[i][0]
      imagenet.decode_rows(jpegs[i], frame, frame.height, scale)
    return round(_cpu_ms(decode, count, rounds), 3)

  batch = np.empty((args.batch, _OUTPUT, _OUTPUT, 3), np.uint8)
  ids = np.random.default_rng(0).permutation(len(old_source))[:args.batch * 4]

  def stream_ms(num_examples: int) -> float:
    stream = pipeline.train_stream(
        num_examples, np.zeros(num_examples), global_batch_size=args.batch, seed=0,
        num_epochs=None, num_steps=None, process_index=0, process_count=1,
        draws_per_example=imagenet.DRAWS_PER_EXAMPLE, draws_after_repeat=True)
    return _cpu_ms(lambda k: stream[k], 4, rounds) / args.batch

  def read_ms(source) -> float:
    return _cpu_ms(lambda k: records.read_many(source, ids[k * args.batch:(k + 1) * args.batch]),
                   4, rounds) / args.batch

  def ms(fn) -> float:
    return round(_cpu_ms(fn, count, rounds), 3)

  return {
      "stream_imagenet_size": round(stream_ms(_IMAGENET_EXAMPLES), 3),
      "stream_over_256_examples": round(stream_ms(256), 3),
      "read_record_batched": round(read_ms(old_source), 3),
      "read_record_single": round(read_ms(new_source), 3),
      "old_open_header": ms(lambda i: imagenet.open_image(jpegs[i])),
      "new_jpeg_frame": ms(lambda i: imagenet.jpeg_frame(jpegs[i])),
      "old_decode_whole": ms(lambda i: imagenet.open_image(jpegs[i]).load()),
      "new_decode_rows": ms(lambda i: imagenet.decode_rows(jpegs[i], plans[i][0], plans[i][3],
                                                            plans[i][2])),
      # At 1/8 scale the IDCT, upsampling and colour conversion nearly vanish: what is left is
      # the entropy decoding of the whole file, which no DCT scale avoids.
      "decode_whole_half_scale": decode_at(2),
      # The rows the new path decodes, at 1/8 scale: the entropy decoding of every row above
      # the crop's bottom, which the new path cannot avoid (nor could any exact crop decoder).
      "entropy_decode_rows": ms(lambda i: imagenet.decode_rows(jpegs[i], plans[i][0],
                                                               plans[i][3], 8)),
      "decode_whole_eighth_scale": decode_at(8),
      "resize_full_decode": ms(lambda i: full[i].resize(
          (_OUTPUT, _OUTPUT), Image.Resampling.BILINEAR, box=plans[i][1])),
      # The new path's resize (nmjax.data.resample: the same pixels, written into the batch and
      # mirrored there), None where it is not available (the new path then uses Pillow's).
      "resample_into_batch": ms(lambda i: resample.resize_into(
          full[i], plans[i][1], _OUTPUT, batch[i % args.batch], mirror=draws[i][-1] < 0.5))
                             if resample.available() else None,
      # What the new path runs per JPEG: the crop's columns and rows decoded and resized in one
      # call (nmjax.data.resample.decode_resize_into), None where it is not available.
      "crop_decode_and_resize": ms(lambda i: resample.decode_resize_into(
          jpegs[i], plans[i][2], tuple(v / plans[i][2] for v in plans[i][1]), _OUTPUT,
          batch[i % args.batch], mirror=draws[i][-1] < 0.5)) if resample.decoder() else None,
      "flip_transpose": ms(lambda i: crops[i].transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
      "to_numpy_into_batch": ms(lambda i: batch.__setitem__(i % args.batch, np.asarray(crops[i]))),
      # Mirroring as numpy's reversed view copied into the batch instead costs about 8x Pillow's.
      "numpy_flip_into_batch": ms(lambda i: batch.__setitem__(
          i % args.batch, np.asarray(crops[i])[:, ::-1])),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256, help="synthetic JPEGs to write")
  parser.add_argument("--large_images", type=int, default=48,
                      help="larger synthetic JPEGs (1024x768, 800x600) for the transform rows")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=20, help="batches timed per run")
  parser.add_argument("--workers", default="0,1,2", help="worker counts to time")
  parser.add_argument("--threads_in_process", default="2",
                      help="extra rows: 0 workers, this many decoding threads in this process")
  parser.add_argument("--rounds", type=int, default=3, help="old/new alternations per setting")
  parser.add_argument("--headline_workers", type=int, default=1,
                      help="the pipeline row (worker count) the headline figures come from")
  provenance.add_out_flag(parser)
  args = parser.parse_args()
  if min(args.images, args.large_images, args.batch, args.batches, args.rounds) < 1:
    parser.error("--images, --large_images, --batch, --batches and --rounds must be at least 1")
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    # TFDS reports on stdout, which holds nothing but the JSON object.
    with mock.patch.object(synthetic_data, "synthetic_jpeg", photo_jpeg), \
        contextlib.redirect_stdout(sys.stderr):
      synthetic_data.write_imagenet(tmp, splits={"train": args.images}, sizes=_SIZES)
      new_records = imagenet.jpeg_records("imagenet2012", "train", data_dir=tmp)
      old_records = imagenet.jpeg_records("imagenet2012", "train", data_dir=tmp,
                                          batched_reads=True)
    write_s = time.perf_counter() - start
    positions = np.arange(_IMAGENET_EXAMPLES) % args.images
    new_source = records.SubsetRecords(new_records, positions)
    old_source = records.SubsetRecords(old_records, positions)
    jpegs = [new_records[i]["image"] for i in range(args.images)]
    draws = rng.random((len(jpegs), imagenet.DRAWS_PER_EXAMPLE))
    large = [photo_jpeg(rng, *_LARGE_SIZES[i % len(_LARGE_SIZES)])
             for i in range(args.large_images)]
    large_draws = rng.random((len(large), imagenet.DRAWS_PER_EXAMPLE))
    pixels = [np.prod(imagenet.open_image(j).size) for j in jpegs]
    results = {
        "machine": {"cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0]},
        "dataset": {"images": len(jpegs), "mean_jpeg_kb": round(np.mean(
            [len(j) for j in jpegs]) / 1e3, 1), "mean_pixels": int(np.mean(pixels)),
            "sizes": [list(s) for s in _SIZES], "write_s": round(write_s, 1),
            "large_mean_jpeg_kb": round(np.mean([len(j) for j in large]) / 1e3, 1)},
        "setting": {"image_size": _OUTPUT, "batch": args.batch, "timed_batches": args.batches,
                    "rounds": args.rounds},
        "transform": {"imagenet_sizes": _transform(jpegs, draws, args.rounds),
                      "large": _transform(large, large_draws, args.rounds)},
        "quality": {"imagenet_sizes": _quality(jpegs, draws),
                    "large": _quality(large, large_draws)},
        "profile_cpu_ms_per_image": _profile(jpegs, draws, old_source, new_source, args),
        "pipeline": _pipelines(old_source, new_source, args),
    }
  rows = results["pipeline"]
  headline = next((r for r in rows if r["workers"] == args.headline_workers
                   and r["threads"] == 1), rows[-1])
  results = {"old_images_per_sec_per_core": headline["old"]["images_per_sec_per_core"],
             "new_images_per_sec_per_core": headline["new"]["images_per_sec_per_core"],
             "new_over_old_per_core": headline["new_over_old_per_core"],
             "headline_workers": headline["workers"],
             "per_core": "images per CPU-second of this process and its workers (images/s / "
                         "cores used), median over rounds"} | results
  print(json.dumps(results))
  # Only now: reading the machine imports jax, which must not start before grain's workers.
  provenance.write("input", results, args.out)


if __name__ == "__main__":
  main()
