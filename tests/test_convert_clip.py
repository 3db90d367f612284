"""CLIP checkpoint import (nmjax.convert.clip_layouts): OpenAI/open_clip RN50 and ViT towers
against reference torch.nn modules written here under open_clip's parameter names (open_clip does
not import beside this torch), at small sizes for the numbers and at full size (on torch's meta
device, no memory) for every name and shape; the QuickGELU switch and its refusals; OpenAI's
TorchScript archives; an open_clip training checkpoint through the import job into a CLIP
workdir that the encoder restores and the transfer job evaluates (zero-shot and linear probe)."""

import collections
import importlib
import json
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest

from nmjax import convert, encoder as encoder_lib, jobs, models
from nmjax.convert import clip_layouts, readers
from nmjax.convert.layouts import Spec
from nmjax.errors import ConfigError, DataError
from nmjax.models.clip_model import CLIP, ResNetVisionConfig
from nmjax.train import clip_training as pretrain_clip
from nmjax.train.steps import normalize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import_config = importlib.import_module("configs.import")  # `import` is a keyword.
transfer_config = importlib.import_module("configs.transfer")

# A ModifiedResNet of RN50's layout at 64 px: stem width 8, one bottleneck per stage but two in
# the second (a block without downsample), a 256-wide attention pool with 4 heads.
SMALL_RN = dict(kind="resnet", layers=(1, 2, 1, 1), width=8, heads=4, image_size=64, channels=3)
SMALL_TEXT = dict(context_length=16, vocab_size=64, text_width=32, text_heads=2, text_layers=2)
# nmjax's clip_small (nmjax.models.clip_model): a 28x28x1 ViT of 7x7 patches, width 64, 2 layers.
CLIP_SMALL = dict(vision=dict(kind="vit", image_size=28, patch=7, width=64, layers=2, heads=2,
                              channels=1), embed_dim=64, context_length=32, vocab_size=49408,
                  text_width=64, text_heads=2, text_layers=2)
FULL = {"clip_rn50": dict(vision=dict(kind="resnet", layers=(3, 4, 6, 3), width=64, heads=32,
                                      image_size=224, channels=3), embed_dim=1024),
        "clip_vit_b16": dict(vision=dict(kind="vit", image_size=224, patch=16, width=768,
                                         layers=12, heads=12, channels=3), embed_dim=512)}
FULL_TEXT = dict(context_length=77, vocab_size=49408, text_width=512, text_heads=8, text_layers=12)


# ---------------------------------------------------------------- reference torch modules

def transformer_class(torch, act):
  """open_clip's Transformer: resblocks.N of pre-LN blocks with nn.MultiheadAttention."""
  nn = torch.nn

  class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
      super().__init__()
      self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
      self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
      self.mlp = nn.Sequential(collections.OrderedDict([
          ("c_fc", nn.Linear(width, 4 * width)), ("gelu", act()),
          ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x, mask=None):
      y = self.ln_1(x)
      x = x + self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
      return x + self.mlp(self.ln_2(x))

  class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
      super().__init__()
      self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))

    def forward(self, x, mask=None):
      for block in self.resblocks:
        x = block(x, mask)
      return x

  return Transformer


def bottleneck_class(torch):
  """open_clip's anti-aliased Bottleneck (stride as an average pool; downsample -1/0/1)."""
  nn = torch.nn

  class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride):
      super().__init__()
      self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.downsample = None
      if stride > 1 or inplanes != planes * 4:
        self.downsample = nn.Sequential(collections.OrderedDict([
            ("-1", nn.AvgPool2d(stride)),
            ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
            ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = self.avgpool(torch.relu(self.bn2(self.conv2(out))))
      out = self.bn3(self.conv3(out))
      return torch.relu(out + (x if self.downsample is None else self.downsample(x)))

  return Bottleneck


def attention_pool_class(torch):
  """open_clip's AttentionPool2d (q/k/v/c_proj, F.multi_head_attention_forward; row 0)."""
  nn, F = torch.nn, torch.nn.functional

  class AttentionPool2d(nn.Module):
    def __init__(self, side, width, heads, output_dim):
      super().__init__()
      self.positional_embedding = nn.Parameter(torch.randn(side ** 2 + 1, width) / width ** 0.5)
      self.k_proj, self.q_proj = nn.Linear(width, width), nn.Linear(width, width)
      self.v_proj, self.c_proj = nn.Linear(width, width), nn.Linear(width, output_dim)
      self.num_heads = heads

    def forward(self, x):
      x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
      x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + self.positional_embedding[:, None]
      x, _ = F.multi_head_attention_forward(
          query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
          q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
          v_proj_weight=self.v_proj.weight, in_proj_weight=None,
          in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
          bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
          out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
          use_separate_proj_weight=True, training=self.training, need_weights=False)
      return x[0]

  return AttentionPool2d


def modified_resnet(torch, embed_dim, *, layers, width, heads, image_size, channels):
  """open_clip's ModifiedResNet: 3-conv stem, average pool, bottleneck stages, attnpool."""
  nn, bottleneck = torch.nn, bottleneck_class(torch)

  class ModifiedResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(channels, width // 2, 3, stride=2, padding=1, bias=False)
      self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
      self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
      self.bn1, self.bn2 = nn.BatchNorm2d(width // 2), nn.BatchNorm2d(width // 2)
      self.bn3, self.avgpool = nn.BatchNorm2d(width), nn.AvgPool2d(2)
      inplanes = width
      for stage, num_blocks in enumerate(layers):
        planes, blocks = width * 2 ** stage, []
        for block in range(num_blocks):
          blocks.append(bottleneck(inplanes, planes, 2 if stage > 0 and block == 0 else 1))
          inplanes = planes * 4
        setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
      self.attnpool = attention_pool_class(torch)(image_size // 32, width * 32, heads, embed_dim)

    def forward(self, x):
      for k in (1, 2, 3):
        x = torch.relu(getattr(self, f"bn{k}")(getattr(self, f"conv{k}")(x)))
      x = self.avgpool(x)
      for stage in range(len(layers)):
        x = getattr(self, f"layer{stage + 1}")(x)
      return self.attnpool(x)

  return ModifiedResNet()


def vision_transformer(torch, transformer, embed_dim, *, image_size, patch, width, layers,
                       heads, channels):
  """open_clip's VisionTransformer (conv1, class token, positions, ln_pre/ln_post, proj)."""
  nn = torch.nn

  class VisionTransformer(nn.Module):
    def __init__(self):
      super().__init__()
      scale = width ** -0.5
      self.conv1 = nn.Conv2d(channels, width, patch, stride=patch, bias=False)
      self.class_embedding = nn.Parameter(scale * torch.randn(width))
      self.positional_embedding = nn.Parameter(
          scale * torch.randn((image_size // patch) ** 2 + 1, width))
      self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
      self.transformer = transformer(width, layers, heads)
      self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, x):
      x = self.conv1(x)
      x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
      x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1)
      x = self.transformer(self.ln_pre(x + self.positional_embedding))
      return self.ln_post(x[:, 0]) @ self.proj

  return VisionTransformer()


def torch_clip(torch, *, vision, embed_dim, context_length, vocab_size, text_width, text_heads,
               text_layers, quick_gelu=False, openai_extras=False):
  """open_clip's CLIP (ModifiedResNet or VisionTransformer image tower, causal text
  transformer), written with torch.nn under open_clip's names; `openai_extras` adds the
  scalars OpenAI's TorchScript archives carry."""
  nn = torch.nn

  class QuickGELU(nn.Module):
    def forward(self, x):
      return x * torch.sigmoid(1.702 * x)

  transformer = transformer_class(torch, QuickGELU if quick_gelu else nn.GELU)
  options = {k: v for k, v in vision.items() if k != "kind"}

  class Clip(nn.Module):
    def __init__(self):
      super().__init__()
      self.visual = (modified_resnet(torch, embed_dim, **options) if vision["kind"] == "resnet"
                     else vision_transformer(torch, transformer, embed_dim, **options))
      self.transformer = transformer(text_width, text_layers, text_heads)
      self.token_embedding = nn.Embedding(vocab_size, text_width)
      self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, text_width))
      self.ln_final = nn.LayerNorm(text_width)
      self.text_projection = nn.Parameter(text_width ** -0.5 * torch.randn(text_width, embed_dim))
      self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
      mask = torch.full((context_length, context_length), float("-inf")).triu(1)
      self.register_buffer("attn_mask", mask, persistent=False)
      if openai_extras:
        for name, value in (("input_resolution", vision["image_size"]),
                            ("context_length", context_length), ("vocab_size", vocab_size)):
          self.register_buffer(name, torch.tensor(value))

    def encode_text(self, text):
      x = self.token_embedding(text) + self.positional_embedding
      x = self.ln_final(self.transformer(x, self.attn_mask))
      return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
      return self.visual(image), self.encode_text(text), self.logit_scale.exp()

  return Clip()


def randomize(torch, module, seed=0):
  """Norms away from the identity and BatchNorm statistics far from (0, 1), so a wrong eps,
  a mean/var swap or a missing statistic shows; eval mode."""
  generator = torch.Generator().manual_seed(seed)
  uniform = lambda t, lo, hi: t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=generator))
  normal = lambda t, std: t.copy_(std * torch.randn(t.shape, generator=generator))
  with torch.no_grad():
    for sub in module.modules():
      if isinstance(sub, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
        uniform(sub.weight, 0.5, 1.5)
        normal(sub.bias, 0.1)
      if isinstance(sub, torch.nn.BatchNorm2d):
        normal(sub.running_mean, 0.2)
        uniform(sub.running_var, 0.5, 2.0)
    module.logit_scale.add_(0.3)
  return module.eval()


def small_rn_model():
  """nmjax's CLIP laid out as SMALL_RN and SMALL_TEXT (exact GELU)."""
  vision = ResNetVisionConfig(layers=SMALL_RN["layers"], width=SMALL_RN["width"],
                              head_width=SMALL_RN["width"] * 32 // SMALL_RN["heads"],
                              image_size=SMALL_RN["image_size"])
  return CLIP(embed_dim=24, vision=vision, **SMALL_TEXT)


def inputs(seed, batch, shape, context_length, vocab_size):
  """NCHW float32 images and token rows: random ids below the end-of-text id (the largest),
  then end-of-text at a random position, zeros after it."""
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch, *shape)).astype(np.float32)
  tokens = np.zeros((batch, context_length), np.int64)
  for row in range(batch):
    end = int(rng.integers(2, context_length))
    tokens[row, :end] = rng.integers(1, vocab_size - 1, end)
    tokens[row, end] = vocab_size - 1
  return images, tokens


def torch_outputs(torch, module, images, tokens):
  with torch.no_grad():
    return [t.numpy() for t in module(torch.from_numpy(images), torch.from_numpy(tokens))]


def relative(ours, reference):
  return convert.max_relative_difference(np.asarray(ours), np.asarray(reference))


def check_against_torch(model, variables, images, tokens, reference):
  """Image embeddings, text embeddings and the temperature of `model` against torch's."""
  ours = jax.jit(lambda v, x, t: model.apply(v, x, t))(
      variables, images.transpose(0, 2, 3, 1), tokens.astype(np.int32))
  differences = [relative(o, r) for o, r in zip(ours, reference)]
  assert max(differences) < 1e-4, differences
  return differences


# ------------------------------------------------------------------------------ numerics

def test_rn50_towers_match_open_clip_from_a_training_checkpoint(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  module = randomize(torch, torch_clip(torch, vision=SMALL_RN, embed_dim=24, **SMALL_TEXT))
  # open_clip's training checkpoint: epoch, name, DDP-prefixed state_dict, optimizer state.
  path = tmp_path / "epoch_32.pt"
  torch.save({"epoch": 32, "name": "RN50-yfcc15m", "optimizer": {"state": {}, "param_groups": []},
              "state_dict": {f"module.{k}": v for k, v in module.state_dict().items()}}, path)
  tensors = readers.read_tensors(str(path))
  model = small_rn_model()
  variables = clip_layouts.import_clip(tensors, model, what=str(path))
  assert set(variables) == {"params", "batch_stats"}
  images, tokens = inputs(1, 3, (3, 64, 64), SMALL_TEXT["context_length"],
                          SMALL_TEXT["vocab_size"])
  check_against_torch(model, variables, images, tokens,
                      torch_outputs(torch, module, images, tokens))


def test_openai_torchscript_vit_matches_and_its_quickgelu_is_enforced(tmp_path):
  torch = pytest.importorskip("torch")
  torch.manual_seed(1)
  module = randomize(torch, torch_clip(torch, quick_gelu=True, openai_extras=True,
                                       **CLIP_SMALL), seed=1)
  images, tokens = inputs(2, 2, (1, 28, 28), 32, 49408)
  path = tmp_path / "ViT-small.pt"  # OpenAI's downloads are TorchScript archives like this.
  traced = torch.jit.trace(module, (torch.from_numpy(images), torch.from_numpy(tokens)),
                           check_trace=False)
  traced.save(str(path))
  checkpoint = readers.read_checkpoint(str(path))
  assert "QuickGELU" in checkpoint.module_types and "input_resolution" in checkpoint.tensors
  with pytest.raises(DataError, match="built with QuickGELU.*--config.quick_gelu=true"):
    convert.load(str(path), "clip_small")
  model, variables = convert.load(str(path), "clip_small", quick_gelu=True)
  assert isinstance(model, CLIP) and model.quick_gelu and "batch_stats" not in variables
  reference = torch_outputs(torch, module, images, tokens)
  check_against_torch(model, variables, images, tokens, reference)
  features = model.apply(variables, images.transpose(0, 2, 3, 1), method=model.encode_image)
  assert features.shape == (2, 64) and relative(features, reference[0]) < 1e-4


# --------------------------------------------------------------------- full-size layouts

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["clip_rn50", "clip_vit_b16"])
def test_full_size_names_and_shapes_map_one_to_one(arch):
  torch = pytest.importorskip("torch")
  with torch.device("meta"):  # Shapes only: nothing is allocated.
    module = torch_clip(torch, openai_extras=arch == "clip_rn50", **FULL[arch], **FULL_TEXT)
  zero = np.zeros((), np.float32)
  tensors = {k: np.broadcast_to(zero, v.shape) for k, v in module.state_dict().items()}
  model = models.get_clip_model(arch)
  variables = clip_layouts.import_clip(tensors, model, what=arch)  # Views: no copy either.
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))
  assert count == sum(int(np.prod(p.shape)) for p in module.parameters())
  if arch == "clip_rn50":  # nmjax.models.clip_model: open_clip's model_profile.csv, 102.01 M.
    assert count == 102_007_137 and variables["batch_stats"]
  tensors["visual.positional_embedding" if arch == "clip_vit_b16" else
          "visual.attnpool.positional_embedding"] = np.zeros((82, 2048), np.float32)
  other = "clip_vit_b16" if arch == "clip_rn50" else "clip_rn50"
  with pytest.raises(DataError) as refused:
    clip_layouts.import_clip(tensors, models.get_clip_model(other), what=f"file as {other}")
  assert "missing" in str(refused.value) and "unexpected" in str(refused.value)
  with pytest.raises(DataError, match="mis-shaped 1: visual.*positional_embedding"):
    clip_layouts.import_clip(tensors, model, what=arch)


# -------------------------------------------------------------------- QuickGELU, inputs

def test_quick_gelu_from_the_name_or_the_flag_and_mismatches_refused(tmp_path):
  resolve = clip_layouts.resolve_quick_gelu
  assert resolve("clip_rn50_quickgelu", None) and resolve("clip_vit_b16_quickgelu", True)
  assert not resolve("clip_rn50", None) and resolve("clip_rn50", True)
  with pytest.raises(ConfigError, match="QuickGELU model, but config.quick_gelu=False"):
    resolve("clip_rn50_quickgelu", False)
  with pytest.raises(DataError, match="built with GELU"):
    resolve("clip_vit_b16_quickgelu", None, stated=False)
  assert [clip_layouts.stated_quick_gelu(frozenset(t)) for t in ({"GELU"}, {"Linear"})] == [
      False, None]
  config = import_config.get_config(f"source={tmp_path / 'none.pt'},arch=clip_rn50_quickgelu")
  config.quick_gelu = False
  with pytest.raises(ConfigError, match="QuickGELU model"):  # Before the file is looked at.
    jobs.run(config, str(tmp_path / "refused"))
  config = import_config.get_config(f"source={tmp_path / 'none.pt'},arch=resnet50")
  config.quick_gelu = True
  with pytest.raises(ConfigError, match="is a CLIP option"):
    jobs.run(config, str(tmp_path / "refused"))


def test_clip_eval_input_is_clips_transform():
  model = models.get_clip_model("clip_rn50")
  imported = convert.Imported("clip_rn50", model, {}, Spec(0, 224, {"quick_gelu": False}))
  chosen = convert.eval_input(imported, "epoch_32.pt", {}, dataset="yfcc15m")
  assert chosen == {"image_size": 224, "crop_pct": 1.0, "interpolation": "bicubic",
                    "mean": pytest.approx(list(pretrain_clip.CLIP_MEAN)),
                    "std": pytest.approx(list(pretrain_clip.CLIP_STD))}
  assert convert.eval_input(imported, "f.pt", {"crop_pct": 0.875},
                            dataset="yfcc15m")["crop_pct"] == 0.875
  with pytest.raises(ConfigError, match="config.input.mean=.* differs"):
    convert.eval_input(imported, "f.pt", {"mean": (0.5, 0.5, 0.5)}, dataset="yfcc15m")
  with pytest.raises(ConfigError, match="gives 28x28x1 inputs, but clip_rn50 takes 224x224x3"):
    convert.eval_input(imported, "f.pt", {}, dataset="digits")


# ------------------------------------------------------------- import job, encoder, transfer

def test_import_job_writes_a_clip_workdir_that_transfer_evaluates(tmp_path, capsys):
  torch = pytest.importorskip("torch")
  torch.manual_seed(2)
  module = randomize(torch, torch_clip(torch, **CLIP_SMALL), seed=2)
  source = tmp_path / "epoch_32.pt"
  torch.save({"epoch": 32, "state_dict": {f"module.{k}": v
                                          for k, v in module.state_dict().items()}}, source)
  images, tokens = inputs(3, 2, (1, 28, 28), 32, 49408)
  reference = torch_outputs(torch, module, images, tokens)
  acts = tmp_path / "acts.npz"
  np.savez(acts, inputs=images, features=reference[0], tokens=tokens, text_features=reference[1])
  config = import_config.get_config(f"source={source},arch=clip_small")
  config.dataset, config.noise_ratio, config.reference = "digits", 0.2, str(acts)
  workdir = str(tmp_path / "imported")
  result = jobs.run(config, workdir)
  assert set(result["differences"]) == {"features", "text_features"}
  assert max(result["differences"].values()) < 1e-4
  assert "text_features largest relative difference" in capsys.readouterr().out
  with open(os.path.join(workdir, "config.json")) as f:
    record = json.load(f)
  assert {k: record[k] for k in ("model", "quick_gelu", "loss", "context_length", "image_size",
                                 "caption_noise", "dtype")} == {
      "model": "clip_small", "quick_gelu": False, "loss": "softmax", "context_length": 32,
      "image_size": 28, "caption_noise": 0.2, "dtype": "float32"}
  assert (record["input"]["crop_pct"], record["input"]["interpolation"]) == (1.0, "bicubic")
  pre = ml_collections.ConfigDict(record)
  assert pretrain_clip.build_model(pre).text_width == 64
  assert pretrain_clip.source_info(pre).image_shape == (28, 28, 1)

  enc = encoder_lib.load(workdir)
  assert enc.encode_text is not None and (enc.feature_dim, enc.context_length) == (64, 32)
  assert (enc.transform.crop_pct, enc.transform.interpolation) == (1.0, "bicubic")
  # The restored encoder: the torch image tower on pixels normalized as the digits set says.
  pixels = np.random.default_rng(4).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  normalized = np.asarray(normalize(pixels, enc.info.mean, enc.info.std)).transpose(0, 3, 1, 2)
  with torch.no_grad():
    expected = module.visual(torch.from_numpy(np.ascontiguousarray(normalized))).numpy()
  assert relative(jax.jit(enc.encode)(enc.variables, pixels), expected) < 1e-4

  transfer = transfer_config.get_config("smoke")
  transfer.checkpoint, transfer.tasks, transfer.methods = workdir, "digits", "zeroshot,lp"
  transfer.zeroshot_templates = "simple"
  transfer.max_examples, transfer.batch_size = 120, 120
  jobs.run(transfer, str(tmp_path / "transfer"))
  with open(tmp_path / "transfer" / "results.jsonl") as f:
    rows = {r["method"]: r for r in map(json.loads, f)}
  assert set(rows) == {"zeroshot", "lp"}
  assert all(0 <= r["accuracy"] <= 1 and r["feature_dim"] == 64 for r in rows.values())
  assert (rows["lp"]["model"], rows["lp"]["noise_ratio"]) == ("clip_small", 0.2)
