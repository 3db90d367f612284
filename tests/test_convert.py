"""Checkpoint import (nmjax.convert): torchvision/timm ResNets and timm ViT-S/16 against reference
torch.nn modules written here under torchvision's and timm's parameter names (torchvision and
timm do not import beside this torch), the readers (safetensors without torch, torch pickles in
their training-checkpoint shapes, bf16), refusal of mismatched names, and the evaluation
transform."""

import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from nmjax import convert
from nmjax.convert import readers
from nmjax.data.transforms import EvalTransform, resize_center_crop
from nmjax.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESNET18 = ((2, 2, 2, 2), False)
RESNET50 = ((3, 4, 6, 3), True)


# ------------------------------------------------------------------ torchvision-named weights

def resnet_state_dict(stage_sizes, bottleneck, num_classes, seed=0):
  """A torchvision ResNet's state dict in numpy: random weights, BatchNorm statistics far from
  the identity (so a wrong eps, mean/var swap or missing statistic shows)."""
  rng = np.random.default_rng(seed)
  weights = {}

  def conv(name, out_channels, in_channels, size):
    std = np.sqrt(2.0 / (in_channels * size * size))
    weights[f"{name}.weight"] = rng.normal(0, std, (out_channels, in_channels, size, size))

  def bn(name, channels):
    weights[f"{name}.weight"] = rng.uniform(0.5, 1.0, channels)
    weights[f"{name}.bias"] = rng.normal(0, 0.1, channels)
    weights[f"{name}.running_mean"] = rng.normal(0, 0.2, channels)
    weights[f"{name}.running_var"] = rng.uniform(0.5, 2.0, channels)
    weights[f"{name}.num_batches_tracked"] = np.asarray(7, np.int64)

  conv("conv1", 64, 3, 7)
  bn("bn1", 64)
  in_channels, expansion = 64, (4 if bottleneck else 1)
  for stage, num_blocks in enumerate(stage_sizes):
    width = 64 * 2 ** stage
    for block in range(num_blocks):
      name = f"layer{stage + 1}.{block}"
      if bottleneck:
        conv(f"{name}.conv1", width, in_channels, 1)
        conv(f"{name}.conv2", width, width, 3)
        conv(f"{name}.conv3", width * 4, width, 1)
      else:
        conv(f"{name}.conv1", width, in_channels, 3)
        conv(f"{name}.conv2", width, width, 3)
      for k in range(3 if bottleneck else 2):
        bn(f"{name}.bn{k + 1}", width * (4 if bottleneck and k == 2 else 1))
      stride = 2 if stage > 0 and block == 0 else 1
      if stride != 1 or in_channels != width * expansion:
        conv(f"{name}.downsample.0", width * expansion, in_channels, 1)
        bn(f"{name}.downsample.1", width * expansion)
      in_channels = width * expansion
  weights["fc.weight"] = rng.normal(0, 0.05, (num_classes, in_channels))
  weights["fc.bias"] = rng.normal(0, 0.1, num_classes)
  return {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in weights.items()}


def relative(ours, reference):
  return convert.max_relative_difference(np.asarray(ours), np.asarray(reference))


# ---------------------------------------------------------------- reference torch modules

def torch_resnet(torch, stage_sizes, bottleneck, num_classes):
  """torchvision's ResNet (v1.5), written with torch.nn under torchvision's names."""
  nn = torch.nn

  class Block(nn.Module):
    def __init__(self, in_channels, width, stride):
      super().__init__()
      expansion = 4 if bottleneck else 1
      if bottleneck:
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
      else:
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
      self.bn1, self.bn2 = nn.BatchNorm2d(width), nn.BatchNorm2d(width)
      self.downsample = None
      if stride != 1 or in_channels != width * expansion:
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, width * expansion, 1, stride, bias=False),
            nn.BatchNorm2d(width * expansion))

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      if bottleneck:
        out = self.bn3(self.conv3(torch.relu(out)))
      return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      in_channels = 64
      for stage, num_blocks in enumerate(stage_sizes):
        width = 64 * 2 ** stage
        blocks = []
        for block in range(num_blocks):
          blocks.append(Block(in_channels, width, 2 if stage > 0 and block == 0 else 1))
          in_channels = width * (4 if bottleneck else 1)
        setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
      self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      for stage in range(len(stage_sizes)):
        x = getattr(self, f"layer{stage + 1}")(x)
      features = x.mean((2, 3))
      return self.fc(features), features

  return ResNet()


def torch_vit(torch, *, grid, width=384, depth=12, heads=6, num_classes=10):
  """timm's VisionTransformer (class token, learned positions, pre-LN blocks with fused qkv,
  exact GELU, LayerNorm eps 1e-6), written with torch.nn under timm's names."""
  nn = torch.nn

  class Attention(nn.Module):
    def __init__(self):
      super().__init__()
      self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
      b, n, c = x.shape
      q, k, v = self.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
      attention = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
      return self.proj((attention @ v).transpose(1, 2).reshape(b, n, c))

  class Mlp(nn.Module):
    def __init__(self):
      super().__init__()
      self.fc1, self.act, self.fc2 = nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width,
                                                                                        width)

    def forward(self, x):
      return self.fc2(self.act(self.fc1(x)))

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention()
      self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp()

    def forward(self, x):
      x = x + self.attn(self.norm1(x))
      return x + self.mlp(self.norm2(x))

  class PatchEmbed(nn.Module):
    def __init__(self):
      super().__init__()
      self.proj = nn.Conv2d(3, width, 16, 16)

  class VisionTransformer(nn.Module):
    def __init__(self):
      super().__init__()
      self.patch_embed = PatchEmbed()
      self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
      self.pos_embed = nn.Parameter(torch.randn(1, grid * grid + 1, width) * 0.02)
      self.blocks = nn.ModuleList(Block() for _ in range(depth))
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, num_classes)

    def forward(self, x):
      x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
      x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
      for block in self.blocks:
        x = block(x)
      features = self.norm(x)[:, 0]
      return self.head(features), features

  return VisionTransformer()


def _torch_outputs(torch, module, images_nchw):
  module.eval()
  with torch.no_grad():
    logits, features = module(torch.from_numpy(images_nchw))
  return logits.numpy(), features.numpy()


def _check_against_torch(path, arch, torch, module, size, seed=1):
  images = np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)
  logits, features = _torch_outputs(torch, module, images)
  model, variables = convert.load(str(path), arch)
  ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                              images.transpose(0, 2, 3, 1))
  assert relative(ours[0], logits) < 1e-4 and relative(ours[1], features) < 1e-4
  return relative(ours[0], logits), relative(ours[1], features)


@pytest.mark.parametrize("arch,shape", [("resnet18", RESNET18), ("resnet50", RESNET50)])
def test_resnets_match_torchvision(arch, shape, tmp_path):
  torch = pytest.importorskip("torch")
  module = torch_resnet(torch, *shape, num_classes=10)
  weights = resnet_state_dict(*shape, num_classes=10)
  module.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
  # timm's train.py checkpoint: the weights under state_dict (here DDP-prefixed) beside its args.
  path = tmp_path / "model.pth.tar"
  torch.save({"epoch": 3, "arch": arch, "args": argparse.Namespace(lr=0.1),
              "state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}}, path)
  _check_against_torch(path, arch, torch, module, size=64)


def test_vit_s16_matches_timm(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  module = torch_vit(torch, grid=2)
  with torch.no_grad():  # LayerNorms away from the identity, so a wrong eps or swap shows.
    for name, parameter in module.named_parameters():
      if "norm" in name:
        parameter.add_(torch.randn_like(parameter) * 0.2)
  path = tmp_path / "pytorch_model.bin"
  torch.save(module.state_dict(), path)  # A raw state dict.
  _check_against_torch(path, "vit_s16", torch, module, size=32)
  model, _ = convert.load(str(path), "vit_s16")
  assert (model.image_size, model.pooling, model.gelu_approximate) == (32, "class_token", False)


# ------------------------------------------------------------------------------- readers

def test_safetensors_import_never_imports_torch(tmp_path):
  path = tmp_path / "model.safetensors"
  save_file(resnet_state_dict(*RESNET18, num_classes=5), str(path))
  code = ("import sys, numpy as np; from nmjax import convert;"
          f" model, variables = convert.load({str(path)!r}, 'resnet18');"
          " logits, features = model.apply(variables, np.zeros((1, 32, 32, 3), np.float32),"
          " train=False); assert logits.shape == (1, 5) and features.shape == (1, 512);"
          " assert 'torch' not in sys.modules, 'torch was imported'")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0, done.stderr[-2000:]


def test_bf16_tensors_become_float32_and_prefixes_go(tmp_path):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  weights = resnet_state_dict(*RESNET18, num_classes=3)
  halves = {f"module.{k}": (v.astype(ml_dtypes.bfloat16) if v.dtype == np.float32 else v)
            for k, v in weights.items()}
  path = tmp_path / "half.safetensors"
  save_file(halves, str(path))
  tensors = readers.read_tensors(str(path))
  assert set(tensors) == set(weights)
  assert tensors["fc.weight"].dtype == np.float32
  np.testing.assert_array_equal(tensors["fc.weight"],
                                weights["fc.weight"].astype(ml_dtypes.bfloat16).astype(np.float32))
  kernel = convert.read(str(path), "resnet18").variables["params"]["stem_conv"]["kernel"]
  np.testing.assert_array_equal(kernel, tensors["conv1.weight"].transpose(2, 3, 1, 0))


def test_mismatched_names_are_refused_by_name(tmp_path):
  weights = resnet_state_dict(*RESNET18, num_classes=4)
  del weights["layer2.0.downsample.1.running_var"]
  weights["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  weights["layer1.1.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  path = tmp_path / "broken.safetensors"
  save_file(weights, str(path))
  with pytest.raises(DataError) as refused:
    convert.load(str(path), "resnet18")
  message = str(refused.value)
  assert "\n" not in message and str(path) in message
  for name in ("missing 1: layer2.0.downsample.1.running_var",
               "unexpected 1: layer5.0.conv1.weight", "mis-shaped 1: layer1.1.conv2.weight"):
    assert name in message, message
  with pytest.raises(DataError, match="missing .*blocks.0.attn.qkv.weight"):
    convert.load(str(path), "vit_s16")  # A ResNet file read as a ViT: every name is wrong.


def test_unknown_files_and_arches_are_refused(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    convert.load(str(tmp_path / "none.pth"), "resnet50")
  (tmp_path / "weights.onnx").write_bytes(b"x")
  with pytest.raises(DataError, match="unknown suffix"):
    convert.load(str(tmp_path / "weights.onnx"), "resnet50")
  with pytest.raises(ValueError, match="config.arch='resnet101' is unknown"):
    convert.load(str(tmp_path / "weights.onnx"), "resnet101")


# ----------------------------------------------------------------- evaluation transform

def test_eval_transform_resizes_the_short_side_and_crops_the_centre():
  image = np.random.default_rng(0).integers(0, 256, (235, 300, 3), dtype=np.uint8)
  # crop 0.95 at 224: the short side becomes floor(224 / 0.95) = 235 (here: unchanged), the
  # crop starts at round(11 / 2) = 6 rows and 38 columns, as torchvision's CenterCrop does.
  out = resize_center_crop(image, 224, 224, EvalTransform(0.95, "bicubic"))
  np.testing.assert_array_equal(out, image[6:230, 38:262])
  grey = np.full((28, 28, 1), 9, np.uint8)
  assert resize_center_crop(grey, 32, 32, EvalTransform(0.95, "bicubic")).shape == (32, 32, 1)
  with pytest.raises(ValueError, match="interpolation"):
    EvalTransform(0.9, "cubic")
