r"""Training throughput of the model zoo on one device, printed as one JSON object.

For each model: images/s of the project's own train step (nmjax.train.steps.train_step with the
SGD-Nesterov + kernel-only weight decay recipe of nmjax.train.state: uint8 normalization on the
device, forward, backward, update, BatchNorm statistics), jitted with the state donated as the
training loop does. Compilation is timed on its own; after one warm-up step, images/s is the
batch over the median of the timed steps (all step times are in the JSON).

FLOPs: XLA:CPU's count for the same step compiled at batch 2 (compiled.cost_analysis()["flops"]:
every convolution and matmul of forward, backward and update), per image, times the batch. On
GPU the compiled program's own count misses the convolutions (they become cuDNN custom calls) and
the lowered program reports none, so the count always comes from XLA:CPU. MFU = counted
FLOPs per second / the chip's peak dense bf16 FLOP/s (table below; None for an unknown chip or
on CPU). The same code runs on CPU, GPU or TPU: it uses the default backend's first device.

Defaults by backend:
  cpu:  resnet_small 28x28x1 batch 128; resnet18 and resnet50 at 128x128x3, batch 16, float32
        (a 2-core CPU runs ResNet-50 at a few images/s). Not 64x64: there the last stage is 2x2,
        where XLA:CPU's 3x3 convolutions are pathologically slow (measured here: 0.5-1.4 s for
        one 512-channel 3x3 convolution of a 32x2x2x512 batch, 0.02 s for 32x3x3x512), a size
        that 224 inputs (7x7 last stage) never reach.
  gpu/tpu: resnet18, resnet50, vit_s16 at 224x224x3, batch 256, bfloat16 compute (float32
        parameters and optimizer state, as configs/pretrain_imagenet.py trains).
Optional peer (--torch, CPU): the same ResNet written in PyTorch (this file; torchvision is not
needed), eager mode, the same batch, size, optimizer and uint8 normalization. JAX and PyTorch
steps alternate, so both see the same background load on a shared machine;
jax_over_torch_speed = torch median step time / JAX median step time (> 1: JAX is faster).
The JSON is also written, with the command, commit, date and machine, to
docs/benchmarks/pretrain-<device>.json (--out to choose the file), after each model as well, so a
run cut short keeps the models it finished.

    .venv/bin/python benchmarks/pretrain.py                 # this machine's defaults
    .venv/bin/python benchmarks/pretrain.py --torch         # + PyTorch eager peer (if installed)
    .venv/bin/python benchmarks/pretrain.py --models resnet50 --image-size 224 --batch 256
"""

import argparse
import functools
import json
import os
import time
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import provenance  # benchmarks/provenance.py
from nmjax.models import DTYPES, get_model
from nmjax.train import state as state_lib
from nmjax.train.steps import train_step

# Peak dense bf16 TFLOP/s per chip (vendor figures, without sparsity), matched against
# jax.Device.device_kind; the first matching entry wins (so "H100 PCIe" before "H100").
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),   # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0),  # Trillium (v6e)
)
_MEAN, _STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)


def peak_tflops(device_kind: str) -> float | None:
  for name, tflops in PEAK_BF16_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def _defaults(backend: str) -> list[tuple[str, int, tuple[int, int, int]]]:
  if backend == "cpu":
    return [("resnet_small", 128, (28, 28, 1)), ("resnet18", 16, (128, 128, 3)),
            ("resnet50", 16, (128, 128, 3))]
  return [(name, 256, (224, 224, 3)) for name in ("resnet18", "resnet50", "vit_s16")]


def _flops(compiled: Any) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0] if analysis else None
  flops = analysis.get("flops") if analysis else None
  return float(flops) if flops and flops > 0 else None


def jax_case(name: str, batch: int, image_shape: tuple[int, ...], dtype: Any,
             num_classes: int) -> tuple[Callable[[], None], dict[str, Any], float | None]:
  """Compiles the project's train step; returns (one blocking step, facts, counted FLOPs/step)."""
  model = get_model(name, num_classes, dtype=dtype)
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, num_classes, batch).astype(np.int32))
  batch_arrays = {
      "image": jnp.asarray(rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8)),
      "label": labels, "clean_label": labels,
  }
  # The fields make_optimizer reads (a namespace keeps ml_collections off accelerator hosts).
  config = types.SimpleNamespace(optimizer="sgd", weight_decay=5e-5, momentum=0.9, nesterov=True)
  tx = state_lib.make_optimizer(config, optax.constant_schedule(0.01))
  state = state_lib.create_train_state(model, jax.random.key(0), (1, *image_shape), tx)
  channels = image_shape[-1]
  step = jax.jit(functools.partial(train_step, mean=_MEAN[:channels], std=_STD[:channels],
                                   num_classes=num_classes, dtype=dtype), donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(state, batch_arrays).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def one_step() -> None:
    holder["state"], metrics = compiled(holder["state"], batch_arrays)
    jax.block_until_ready((holder["state"], metrics))
    if not np.isfinite(float(metrics["loss"])):
      raise RuntimeError(f"{name}: non-finite loss in the benchmark")

  facts = {"batch": batch, "image_shape": list(image_shape), "dtype": jnp.dtype(dtype).name,
           "compile_s": round(compile_s, 2)}
  return one_step, facts, _cpu_flops_per_image(step, state, batch_arrays) * batch


def _cpu_flops_per_image(step: Any, state: Any, batch_arrays: dict[str, Any]) -> float:
  """XLA:CPU's FLOP count of `step` on a batch of 2, per image (shapes only; nothing runs)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  small = {k: v[:2] for k, v in batch_arrays.items()}
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu) if hasattr(x, "shape") else x,
      (state, small))
  flops = _flops(step.lower(*abstract).compile())
  return float("nan") if flops is None else flops / 2


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
  """Seconds per call of each step, after one warm-up call each, calling them in turn.

  Taking turns exposes every contender to the same background load on a shared machine; the
  median of the per-call times then ignores the calls that a burst of other work slowed.
  """
  for step in steps.values():
    step()  # warm-up: one-off allocations (and, for torch, kernel selection)
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return times


# ----------------------------------------------------------------------------------------------
# PyTorch eager peer (CPU): the same architectures as nmjax.models.resnet, written for torch.

def _torch_resnet(name: str, num_classes: int):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    def __init__(self, in_ch: int, width: int, stride: int, bottleneck: bool):
      super().__init__()
      out_ch = width * (4 if bottleneck else 1)
      if bottleneck:  # 1x1 reduce, strided 3x3 (v1.5), 1x1 expand
        layers = [nn.Conv2d(in_ch, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                  nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                  nn.ReLU(), nn.Conv2d(width, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
      else:
        layers = [nn.Conv2d(in_ch, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width),
                  nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1, bias=False),
                  nn.BatchNorm2d(width)]
      self.body = nn.Sequential(*layers)
      self.proj = None if (in_ch == out_ch and stride == 1) else nn.Sequential(
          nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x):
      shortcut = x if self.proj is None else self.proj(x)
      return torch.relu(self.body(x) + shortcut)

  bottleneck = name == "resnet50"
  sizes = (3, 4, 6, 3) if bottleneck else (2, 2, 2, 2)
  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(3, 2, 1)]
  in_ch = 64
  for stage, (count, width) in enumerate(zip(sizes, (64, 128, 256, 512))):
    for block in range(count):
      layers.append(Block(in_ch, width, 2 if stage > 0 and block == 0 else 1, bottleneck))
      in_ch = width * (4 if bottleneck else 1)
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes)]
  return nn.Sequential(*layers)


def torch_case(name: str, batch: int, image_shape: tuple[int, ...],
               num_classes: int) -> tuple[Callable[[], None], dict[str, Any]] | None:
  """The PyTorch eager peer's one training step (None without torch or for other models)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if name not in ("resnet18", "resnet50") or image_shape[-1] != 3:
    return None
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  model = _torch_resnet(name, num_classes).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                              weight_decay=5e-5)
  rng = np.random.default_rng(0)
  images = torch.from_numpy(rng.integers(0, 256, (batch, *image_shape), dtype=np.uint8))
  labels = torch.from_numpy(rng.integers(0, num_classes, batch))
  mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(_STD).view(1, 3, 1, 1)

  def one_step() -> None:
    x = (images.permute(0, 3, 1, 2).float() - mean) / std
    loss = torch.nn.functional.cross_entropy(model(x), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if not torch.isfinite(loss):
      raise RuntimeError(f"{name}: non-finite loss in the torch peer")

  return one_step, {"torch": torch.__version__, "threads": torch.get_num_threads()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="", help="comma-separated; default: per backend")
  parser.add_argument("--batch", type=int, default=0, help="0: the backend's default")
  parser.add_argument("--image-size", type=int, default=0, help="0: the backend's default")
  parser.add_argument("--steps", type=int, default=0, help="timed steps; 0: 3 on CPU, 20 else")
  parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                      help="auto: float32 on CPU, bfloat16 on accelerators")
  parser.add_argument("--num-classes", type=int, default=1000)
  parser.add_argument("--torch", action="store_true", help="also time the PyTorch eager peer")
  provenance.add_out_flag(parser)
  args = parser.parse_args()

  backend = jax.default_backend()
  device = jax.devices()[0]
  dtype = (DTYPES[args.dtype] if args.dtype != "auto"
           else jnp.float32 if backend == "cpu" else jnp.bfloat16)
  steps = args.steps or (3 if backend == "cpu" else 20)
  cases = _defaults(backend)
  if args.models:
    wanted = args.models.split(",")
    cases = [c for c in cases if c[0] in wanted] + [
        (m, 16 if backend == "cpu" else 256, (224, 224, 3))
        for m in wanted if m not in {c[0] for c in cases}]
  results: dict[str, Any] = {
      "machine": {"backend": backend, "device": device.device_kind,
                  "peak_bf16_tflops": peak_tflops(device.device_kind),
                  "cpu_count": os.cpu_count(), "jax": jax.__version__,
                  "load_average": round(os.getloadavg()[0], 2)},
      "flops_source": ("XLA:CPU compiled.cost_analysis()['flops'] of the jitted train step at"
                       " batch 2, per image, times the batch"),
  }
  peak = peak_tflops(device.device_kind)
  for name, batch, shape in cases:
    batch = args.batch or batch
    if args.image_size and shape[-1] == 3:
      shape = (args.image_size, args.image_size, 3)
    jax_step, entry, flops = jax_case(name, batch, shape, dtype, args.num_classes)
    contenders = {"jax": jax_step}
    peer = torch_case(name, batch, shape, args.num_classes) if (
        args.torch and backend == "cpu") else None
    if peer is not None:
      contenders["torch"] = peer[0]
    times = time_interleaved(contenders, steps)
    median = {k: float(np.median(v)) for k, v in times.items()}
    entry |= {"timed_steps": steps, "step_ms_median": round(median["jax"] * 1e3, 2),
              "step_ms_all": [round(t * 1e3, 1) for t in times["jax"]],
              "images_per_s": round(batch / median["jax"], 1),
              "gflops_per_image": round(flops / batch / 1e9, 2)}
    if np.isfinite(flops) and peak is not None:
      entry["tflops_per_s"] = round(flops / median["jax"] / 1e12, 1)
      entry["mfu"] = round(flops / median["jax"] / (peak * 1e12), 4)
    if peer is not None:
      entry["torch_eager"] = peer[1] | {
          "step_ms_median": round(median["torch"] * 1e3, 2),
          "step_ms_all": [round(t * 1e3, 1) for t in times["torch"]],
          "images_per_s": round(batch / median["torch"], 1)}
      entry["jax_over_torch_speed"] = round(median["torch"] / median["jax"], 3)
    results[name] = entry
    print(json.dumps({name: entry}), flush=True)  # partial results survive a timeout
    provenance.write("pretrain", results, args.out, complete=False)
  print(json.dumps(results))
  provenance.write("pretrain", results, args.out)


if __name__ == "__main__":
  main()
