"""OpenAI and open_clip CLIP checkpoints -> nmjax.models.clip_model.CLIP (both towers).

  clip_rn50, clip_rn50_quickgelu         ModifiedResNet (3, 4, 6, 3) with attention pooling
                                         (visual.conv1..3/bn1..3, visual.layerS.B.*,
                                         visual.attnpool.positional_embedding/q/k/v/c_proj)
  clip_vit_b16, clip_vit_b16_quickgelu   ViT-B/16 (visual.conv1, class_embedding,
                                         positional_embedding, ln_pre, transformer, ln_post, proj)
  clip_small                             nmjax's own small CLIP under the same names (tests, toys)
and, for every one, the text tower: token_embedding, positional_embedding,
transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias, attn.out_proj, ln_2, mlp.c_fc,
mlp.c_proj}, ln_final, text_projection, logit_scale. The names are open_clip's CLIP module's,
which OpenAI's model.py also uses; nmjax.models.clip_model spells them with '/' and '_N' (see its
docstring), so the layout is built from the nmjax model itself and every size is checked by
nmjax.convert.mapping.assign. Buffers that are not weights are dropped: the three scalars
OpenAI's TorchScript archives carry (input_resolution, context_length, vocab_size) and the text
tower's causal `attn_mask` (open_clip registers it non-persistent, but a TorchScript archive of an
open_clip model saves it anyway); nmjax builds its own mask.

QuickGELU. OpenAI's released weights and open_clip's `RN50-quickgelu` / `ViT-B-16-quickgelu`
were trained with QuickGELU (x sigmoid(1.702 x)), open_clip's `RN50` / `ViT-B-16` with exact
GELU; a state dict does not say which (the activation has no weights), and an open_clip training
checkpoint (epoch_N.pt: epoch, name, state_dict, optimizer) carries no flag either. So the switch
is taken from the arch name (`_quickgelu`: QuickGELU) or an explicit quick_gelu flag (the plain
names default to GELU); what is refused:
  - the name and the flag disagree (`clip_rn50_quickgelu` with quick_gelu=False);
  - a TorchScript archive (OpenAI's .pt downloads) whose module classes say QuickGELU or GELU
    disagrees with the choice: the only file kind that states its activation.
Not detectable: a plain state dict (.pth, .pt, .bin, .safetensors) of the wrong variant imports
and computes slightly different embeddings; the text tower of an RN50 is where it matters (the
ModifiedResNet has no GELU), so a zero-shot score far below the published one is the symptom.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nmjax.convert import mapping
from nmjax.convert.mapping import Layout
from nmjax.errors import ConfigError, DataError
from nmjax.models.clip_model import CLIP, ResNetVisionConfig, ViTVisionConfig

# Scalars OpenAI's TorchScript archives keep beside the weights (their build_model drops them).
OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
# CLIP's evaluation transform: the short side resized bicubically to the input size, centre crop.
CLIP_TRANSFORM = {"crop_pct": 1.0, "interpolation": "bicubic"}


@dataclasses.dataclass(frozen=True)
class ClipArch:
  """One importable CLIP: the nmjax.models.CLIP_MODELS name it becomes, the activation its name
  states (True: QuickGELU; None: not stated, exact GELU unless the flag says otherwise), and
  whose checkpoints carry it."""
  model: str
  quick_gelu: bool | None
  names: str


CLIP_ARCHS: dict[str, ClipArch] = {
    "clip_rn50": ClipArch("clip_rn50", None, "open_clip RN50"),
    "clip_rn50_quickgelu": ClipArch("clip_rn50", True,
                                    "OpenAI RN50 / open_clip RN50-quickgelu"),
    "clip_vit_b16": ClipArch("clip_vit_b16", None, "open_clip ViT-B-16"),
    "clip_vit_b16_quickgelu": ClipArch("clip_vit_b16", True,
                                       "OpenAI ViT-B/16 / open_clip ViT-B-16-quickgelu"),
    "clip_small": ClipArch("clip_small", None, "nmjax clip_small under open_clip names"),
}


def stated_quick_gelu(module_types: frozenset[str]) -> bool | None:
  """What a TorchScript archive's module classes say: True (QuickGELU), False (GELU), None."""
  if "QuickGELU" in module_types:
    return True
  return False if "GELU" in module_types else None


def resolve_quick_gelu(arch: str, flag: bool | None, stated: bool | None = None, *,
                       what: str = "the file") -> bool:
  """The QuickGELU switch of an import: the name's, else the flag's, else exact GELU; refuses a
  name that the flag contradicts (ConfigError) and a choice the file contradicts (DataError)."""
  named = CLIP_ARCHS[arch].quick_gelu
  if flag is not None and not isinstance(flag, bool):
    raise ConfigError(f"config.quick_gelu={flag!r} must be true, false or unset")
  if named is not None and flag is not None and flag != named:
    raise ConfigError(f"config.arch={arch} is a QuickGELU model, but config.quick_gelu={flag};"
                      f" pass config.arch={CLIP_ARCHS[arch].model} for exact GELU, or drop"
                      " the flag")
  chosen = named if named is not None else bool(flag)
  if stated is not None and stated != chosen:
    says, other = ("QuickGELU", "true") if stated else ("GELU", "false")
    raise DataError(f"{what} is a TorchScript archive built with {says}, but config.arch={arch}"
                    f" with config.quick_gelu={flag} imports it with"
                    f" {'QuickGELU' if chosen else 'exact GELU'}; pass"
                    f" --config.quick_gelu={other} (or the matching arch name)")
  return chosen


# ------------------------------------------------------------------------------- layouts

def transformer_layout(torch_prefix: str, flax_prefix: mapping.Path, layers: int) -> Layout:
  """open_clip's Transformer (resblocks.N with nn.MultiheadAttention) -> nmjax's."""
  layout: Layout = {}
  for i in range(layers):
    name, block = f"{torch_prefix}transformer.resblocks.{i}", (*flax_prefix, "transformer",
                                                              f"resblocks_{i}")
    attention = ("params", *block, "attn", "in_proj")
    layout[f"{name}.attn.in_proj_weight"] = [((*attention, "kernel"), mapping.dense_kernel)]
    layout[f"{name}.attn.in_proj_bias"] = [((*attention, "bias"), mapping.same)]
    layout.update(mapping.linear(f"{name}.attn.out_proj", (*block, "attn", "out_proj")))
    layout.update(mapping.layer_norm(f"{name}.ln_1", (*block, "ln_1")))
    layout.update(mapping.layer_norm(f"{name}.ln_2", (*block, "ln_2")))
    layout.update(mapping.linear(f"{name}.mlp.c_fc", (*block, "mlp", "c_fc")))
    layout.update(mapping.linear(f"{name}.mlp.c_proj", (*block, "mlp", "c_proj")))
  return layout


def resnet_tower_layout(vision: ResNetVisionConfig) -> Layout:
  """open_clip's ModifiedResNet (3-conv stem, anti-aliased bottlenecks whose downsample is
  Sequential(-1: AvgPool, 0: conv, 1: BatchNorm), attention pool) -> nmjax's."""
  layout: Layout = {}
  for k in (1, 2, 3):
    layout.update(mapping.conv(f"visual.conv{k}", ("visual", f"conv{k}")))
    layout.update(mapping.batch_norm(f"visual.bn{k}", ("visual", f"bn{k}")))
  for stage, num_blocks in enumerate(vision.layers):
    for block in range(num_blocks):
      name, flax_name = f"visual.layer{stage + 1}.{block}", ("visual", f"layer{stage + 1}_{block}")
      for k in (1, 2, 3):
        layout.update(mapping.conv(f"{name}.conv{k}", (*flax_name, f"conv{k}")))
        layout.update(mapping.batch_norm(f"{name}.bn{k}", (*flax_name, f"bn{k}")))
      if block == 0:  # A stride (stages 2..) or a width change (stage 1: width -> 4 width).
        layout.update(mapping.conv(f"{name}.downsample.0", (*flax_name, "downsample_0")))
        layout.update(mapping.batch_norm(f"{name}.downsample.1", (*flax_name, "downsample_1")))
  pool = ("visual", "attnpool")
  layout["visual.attnpool.positional_embedding"] = [(("params", *pool, "positional_embedding"),
                                                     mapping.same)]
  for projection in ("q_proj", "k_proj", "v_proj", "c_proj"):
    layout.update(mapping.linear(f"visual.attnpool.{projection}", (*pool, projection)))
  return layout


def vit_tower_layout(vision: ViTVisionConfig) -> Layout:
  """open_clip's VisionTransformer (class token, learned positions, ln_pre/ln_post, proj)."""
  layout: Layout = {**mapping.conv("visual.conv1", ("visual", "conv1")),
                    **mapping.layer_norm("visual.ln_pre", ("visual", "ln_pre")),
                    **mapping.layer_norm("visual.ln_post", ("visual", "ln_post"))}
  for name in ("class_embedding", "positional_embedding", "proj"):
    layout[f"visual.{name}"] = [(("params", "visual", name), mapping.same)]
  layout.update(transformer_layout("visual.", ("visual",), vision.layers))
  return layout


def clip_layout(model: CLIP) -> Layout:
  """The name map of `model`'s image tower, text tower and temperature."""
  if isinstance(model.vision, ResNetVisionConfig):
    layout = resnet_tower_layout(model.vision)
  else:
    layout = vit_tower_layout(model.vision)
  for name in ("positional_embedding", "text_projection", "logit_scale"):
    layout[name] = [(("params", name), mapping.same)]
  if model.siglip:
    layout["logit_bias"] = [(("params", "logit_bias"), mapping.same)]
  layout["token_embedding.weight"] = [(("params", "token_embedding", "embedding"), mapping.same)]
  layout.update(mapping.layer_norm("ln_final", ("ln_final",)))
  layout.update(transformer_layout("", (), model.text_layers))
  return layout


def template(model: CLIP) -> Any:
  """The abstract variables of `model` (shapes only; nothing is computed)."""
  images = jax.ShapeDtypeStruct((1, *model.image_shape), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
  return jax.eval_shape(lambda x, t: model.init(jax.random.key(0), x, t), images, tokens)


def import_clip(tensors: dict[str, np.ndarray], model: CLIP, *, what: str) -> dict[str, Any]:
  """`model`'s variables ({"params"[, "batch_stats"]}, float32 numpy) from an open_clip/OpenAI
  state dict; a missing, unexpected or mis-shaped name is refused by mapping.assign."""
  mask = (model.context_length, model.context_length)
  kept = {name: value for name, value in tensors.items()
          if not (name in OPENAI_EXTRAS and np.ndim(value) == 0)
          and not (name == "attn_mask" and np.shape(value) == mask)}
  return mapping.assign(kept, clip_layout(model), template(model), what=what)
