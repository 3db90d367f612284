"""PyTorch and safetensors checkpoints -> nmjax models and variables, with torch optional.

    model, variables = nmjax.convert.load("resnet50_noise_10/model.pth.tar", "resnet50")
    logits, features = model.apply(variables, images_nhwc, train=False)

`images_nhwc` are float32 images normalized as the source model expects: the same numbers the
PyTorch model takes, transposed from NCHW. The files are read by nmjax.convert.readers
(safetensors without torch; torch pickles with torch, weights only; TorchScript archives as
data, without torch, nothing in them run), their names mapped by nmjax.convert.layouts (ARCHS:
resnet18, resnet50, vit_s16, vit_b16) and nmjax.convert.clip_layouts (CLIP_ARCHS), and every
name, shape and variable checked by nmjax.convert.mapping. The import job (configs/import.py)
writes the result as a pre-training workdir that every evaluation job reads like its own
(save_workdir).

A CLIP arch (clip_rn50, clip_rn50_quickgelu, clip_vit_b16, clip_vit_b16_quickgelu, clip_small)
gives the nmjax.models.clip_model.CLIP module itself, not a (logits, features) classifier:

    model, variables = nmjax.convert.load("yfcc15m_noise_10/epoch_32.pt", "clip_rn50")
    image_embed, text_embed, logit_scale = model.apply(variables, images_nhwc, tokens)
    features = model.apply(variables, images_nhwc, method=model.encode_image)  # (N, 1024)
    text = model.apply(variables, tokens, method=model.encode_text)

the embeddings unnormalized (as open_clip's encode_image / encode_text), logit_scale already
exp()'d (clipped at 100); `tokens` from nmjax.clip.tokenizer.tokenize (context 77).

A folder instead of a file is a Hugging Face text model (BERT, RoBERTa, GPT-2) as transformers'
save_pretrained writes it; its config.json says the architecture (nmjax.convert.hf_text):

    model, variables = nmjax.convert.load("bert-base-uncased/")
    hidden_states, pooled = model.apply(variables, ids, mask, train=False)

`ids, mask` from nmjax.text.tokenizer(folder).encode(texts, max_length).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nmjax import features as features_lib, io as nmjax_io, models
from nmjax.convert import clip_layouts, hf_text, layouts, mapping, readers
from nmjax.convert.clip_layouts import CLIP_ARCHS, ClipArch
from nmjax.convert.layouts import ARCHS, Arch, Spec
from nmjax.data.transforms import INTERPOLATIONS
from nmjax.errors import ConfigError, DataError
from nmjax.train import checkpoint

__all__ = ["load"]  # The rest serves the import job (configs/import.py) and the tests.

INPUT_FIELDS = ("image_size", "crop_pct", "interpolation", "mean", "std")
# Input arrays of a reference file (NCHW, as fed to PyTorch), in the order they are looked for.
REFERENCE_INPUTS = ("inputs", "input", "images")
REFERENCE_OUTPUTS = ("logits", "features")
# A CLIP's reference outputs: image embeddings of `inputs`, text embeddings of `tokens`.
CLIP_REFERENCE_OUTPUTS = ("features", "text_features")


@dataclasses.dataclass(frozen=True)
class Imported:
  """A converted checkpoint: the nmjax model, its variables and what the file said."""
  arch: str
  model: nn.Module
  variables: dict[str, Any]
  spec: Spec


def check_arch(arch: str) -> Arch | ClipArch:
  """The importable architecture `arch` (ARCHS or CLIP_ARCHS); ConfigError naming them all."""
  if arch not in ARCHS and arch not in CLIP_ARCHS:
    raise ConfigError(f"config.arch={arch!r} is unknown; allowed:"
                      f" {', '.join([*ARCHS, *CLIP_ARCHS])}")
  return ARCHS[arch] if arch in ARCHS else CLIP_ARCHS[arch]


def is_clip(arch: str) -> bool:
  """Whether `arch` is a CLIP (two towers; see the module docstring for what load returns)."""
  return arch in CLIP_ARCHS


def clip_from_tensors(tensors: dict[str, np.ndarray], arch: str, *, what: str,
                      quick_gelu: bool | None = None,
                      stated_quick_gelu: bool | None = None) -> Imported:
  """The nmjax CLIP of a CLIP arch from an open_clip/OpenAI state dict; the QuickGELU switch
  as nmjax.convert.clip_layouts says (name, flag, a TorchScript archive's module classes)."""
  chosen = CLIP_ARCHS[arch]
  quick = clip_layouts.resolve_quick_gelu(arch, quick_gelu, stated_quick_gelu, what=what)
  model = models.get_clip_model(chosen.model, quick_gelu=quick)
  variables = clip_layouts.import_clip(tensors, model, what=f"{what} as {chosen.names} ({arch})")
  spec = Spec(num_classes=0, image_size=model.vision.image_size, options={"quick_gelu": quick})
  return Imported(arch, model, jax.tree.map(jnp.asarray, variables), spec)


def from_tensors(tensors: dict[str, np.ndarray], arch: str, *, what: str,
                 quick_gelu: bool | None = None) -> Imported:
  """The nmjax model and variables of `arch` from a state dict (see nmjax.convert.mapping for
  how a mismatch is refused; `what` names the file in that message). `quick_gelu`: a CLIP's
  explicit switch (None: the arch name's); other archs refuse it."""
  chosen = check_arch(arch)
  if is_clip(arch):
    return clip_from_tensors(tensors, arch, what=what, quick_gelu=quick_gelu)
  if quick_gelu is not None:
    raise ConfigError(f"config.quick_gelu is a CLIP option; config.arch={arch} takes none")
  spec = chosen.spec(tensors)
  model = models.get_model(chosen.model, num_classes=spec.num_classes, **spec.options)
  shape = jax.ShapeDtypeStruct((1, spec.image_size, spec.image_size, 3), jnp.float32)
  template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), shape)
  variables = mapping.assign(tensors, chosen.layout(spec), template,
                             what=f"{what} as {chosen.names} ({arch})")
  return Imported(arch, model, jax.tree.map(jnp.asarray, variables), spec)


def read(path: str, arch: str, *, trust_pickle: bool = False,
         quick_gelu: bool | None = None) -> Imported:
  """Reads and converts the checkpoint file `path` as `arch` (ARCHS or CLIP_ARCHS).

  `trust_pickle`: torch unpickles arbitrary objects and torch.jit.load reads a TorchScript
  archive (running its code); only for files you trust."""
  check_arch(arch)
  if is_clip(arch):  # Refuse a name/flag contradiction before reading the file.
    clip_layouts.resolve_quick_gelu(arch, quick_gelu)
  checkpoint = readers.read_checkpoint(path, trust_pickle=trust_pickle)
  if is_clip(arch):
    return clip_from_tensors(
        checkpoint.tensors, arch, what=path, quick_gelu=quick_gelu,
        stated_quick_gelu=clip_layouts.stated_quick_gelu(checkpoint.module_types))
  return from_tensors(checkpoint.tensors, arch, what=path, quick_gelu=quick_gelu)


def load(path: str, arch: str | None = None, *, quick_gelu: bool | None = None,
         pooling: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
  """Reads a PyTorch or safetensors checkpoint file, or a Hugging Face text model folder, as an
  nmjax model and its variables.

  Args:
    path: the file (.safetensors, .pth, .pth.tar, .pt, .bin; TorchScript archives too), or a
      folder written by transformers' save_pretrained (config.json with model_type bert,
      roberta or gpt2, and model.safetensors or pytorch_model.bin).
    arch: a file's architecture: resnet18, resnet50, vit_s16, vit_b16, or a CLIP arch
      (clip_rn50, clip_rn50_quickgelu, clip_vit_b16, clip_vit_b16_quickgelu, clip_small). A
      folder's is read from its config.json: leave it None.
    quick_gelu: a CLIP's activation (None: the arch name's); other archs take none.
    pooling: a text model's pooled vector: "cls", "mean" or "last" (None: cls for BERT and
      RoBERTa, last for GPT-2); other models take none.

  Returns:
    (model, variables). Supervised archs: model.apply(variables, images, train=False) returns
    (logits, pooled features) for NHWC float32 images normalized as the source expects. CLIP
    archs: the CLIP module (see the module docstring). Text folders:
    model.apply(variables, ids, mask, train=False) returns (hidden_states (B, L, hidden),
    pooled (B, hidden)), hidden_states equal to transformers' last_hidden_state.

  Raises:
    ConfigError: an unknown arch, a QuickGELU switch the arch contradicts, a file without an
      arch, or a folder without config.json or of another model_type.
    DataError: a file that is missing, unreadable, or not that architecture (one line naming
      the missing and unexpected tensors).

  Examples:
    >>> from nmjax import convert
    >>> model, variables = convert.load("resnet50.safetensors", "resnet50")  # doctest: +SKIP
    >>> logits, features = model.apply(variables, images_nhwc, train=False)  # doctest: +SKIP
    >>> convert.load("no_such_file.pth", "resnet50")
    Traceback (most recent call last):
    ...
    nmjax.errors.DataError: checkpoint file no_such_file.pth does not exist
  """
  if arch is None:
    if nmjax_io.isdir(path):
      if quick_gelu is not None:
        raise ConfigError("quick_gelu is a CLIP option; a Hugging Face text model takes none")
      return hf_text.load_hf(path, pooling=pooling)
    raise ConfigError(f"checkpoint file {path} needs its architecture; pass arch, one of"
                      f" {', '.join([*ARCHS, *CLIP_ARCHS])} (only a Hugging Face folder's is"
                      " read from its config.json)")
  if pooling is not None:
    raise ConfigError(f"pooling is a text model's option; {arch} takes none")
  imported = read(path, arch, quick_gelu=quick_gelu)
  return imported.model, imported.variables


# ---------------------------------------------------------------------- evaluation input

def hub_input(path: str) -> dict[str, Any]:
  """The evaluation input a Hugging Face hub download of a timm model states: the
  `pretrained_cfg` of the config.json beside the file (empty when there is none)."""
  beside = nmjax_io.join(os.path.dirname(nmjax_io.absolute(path)), "config.json")
  try:
    stated = json.loads(nmjax_io.read_text(beside)).get("pretrained_cfg")
  except (OSError, ValueError, AttributeError):
    return {}
  if not isinstance(stated, dict):
    return {}
  found = {k: stated[k] for k in ("crop_pct", "interpolation", "mean", "std") if k in stated}
  if isinstance(stated.get("input_size"), (list, tuple)) and stated["input_size"]:
    found["image_size"] = stated["input_size"][-1]
  return found


def eval_input(imported: Imported, path: str, given: Mapping[str, Any], *,
               dataset: str = "unknown") -> dict[str, Any]:
  """The model's evaluation input (INPUT_FIELDS; mean and std in 0..1 units): the fields set in
  `given`, else the hub config.json's, else the architecture's defaults; checked. A CLIP's is
  clip_eval_input's (`dataset`: what it was pre-trained on)."""
  if is_clip(imported.arch):
    return clip_eval_input(imported, given, dataset)
  resolved: dict[str, Any] = {"image_size": imported.spec.image_size,
                              **ARCHS[imported.arch].input, **hub_input(path)}
  resolved.update({k: v for k, v in given.items() if v is not None})
  return checked_input(resolved, imported)


def clip_eval_input(imported: Imported, given: Mapping[str, Any], dataset: str
                    ) -> dict[str, Any]:
  """A CLIP's evaluation input: the size and normalisation its encoder takes
  (nmjax.train.clip_training.source_info of `dataset`: CLIP's mean and std at the tower's size
  for real image-text data, an embedded set's own), which `given` may restate but not change;
  and CLIP's transform (bicubic resize of the short side, centre crop), which it may."""
  from nmjax.train import clip_training  # pylint: disable=g-import-not-at-top
  info = clip_training.source_info(
      types.SimpleNamespace(dataset=dataset, image_size=imported.spec.image_size))
  if tuple(info.image_shape) != tuple(imported.model.image_shape):
    raise ConfigError(
        f"config.dataset={dataset!r} gives {'x'.join(map(str, info.image_shape))} inputs, but"
        f" {imported.arch} takes {'x'.join(map(str, imported.model.image_shape))}; pass the"
        " dataset it was pre-trained on (an embedded set for clip_small)")
  fixed = {"image_size": int(info.image_shape[0]), "mean": [m / 255.0 for m in info.mean],
           "std": [s / 255.0 for s in info.std]}
  for field, value in fixed.items():
    stated = given.get(field)
    if stated is not None and (np.shape(stated) != np.shape(value) or not np.allclose(
        np.asarray(stated, np.float64), value, rtol=1e-6, atol=1e-9)):
      raise ConfigError(f"config.input.{field}={stated} differs from what a CLIP encoder of"
                        f" {dataset!r} takes ({value}); leave it unset")
  resolved = {**fixed, **clip_layouts.CLIP_TRANSFORM,
              **{k: given[k] for k in ("crop_pct", "interpolation") if given.get(k) is not None}}
  return checked_input(resolved, imported)


def check_transform(crop_pct: float | None, interpolation: str | None) -> None:
  """Fails with one line for an unknown interpolation or a crop_pct outside (0, 1]; None (not
  set) passes."""
  if interpolation is not None and interpolation not in INTERPOLATIONS:
    raise ConfigError(f"config.input.interpolation={interpolation!r} is unknown;"
                      f" allowed: {', '.join(INTERPOLATIONS)}")
  if crop_pct is not None and not 0 < crop_pct <= 1:
    raise ConfigError(f"config.input.crop_pct={crop_pct} is out of range; allowed:"
                      " 0 < crop_pct <= 1")


def checked_input(resolved: dict[str, Any], imported: Imported) -> dict[str, Any]:
  """`resolved`'s INPUT_FIELDS as numbers, each checked; ConfigError with one line."""
  resolved["image_size"] = int(resolved["image_size"])
  resolved["crop_pct"] = float(resolved["crop_pct"])
  resolved["mean"] = [float(m) for m in resolved["mean"]]
  resolved["std"] = [float(s) for s in resolved["std"]]
  check_transform(resolved["crop_pct"], resolved["interpolation"])
  channels = 1 if is_clip(imported.arch) and imported.model.image_shape[-1] == 1 else 3
  if (len(resolved["mean"]) != channels or len(resolved["std"]) != channels
      or min(resolved["std"]) <= 0):
    raise ConfigError(f"config.input.mean={resolved['mean']} / std={resolved['std']} must be"
                      f" {channels} number(s) each (0..1 units), std > 0")
  learned = imported.spec.options.get("position_embedding") == "learned"
  if learned and resolved["image_size"] != imported.spec.image_size:
    raise ConfigError(f"config.input.image_size={resolved['image_size']}, but the file's"
                      f" learned positions are for {imported.spec.image_size}; allowed:"
                      f" {imported.spec.image_size}")
  if resolved["image_size"] < 32 and not is_clip(imported.arch):
    raise ConfigError(f"config.input.image_size={resolved['image_size']} is out of range;"
                      " allowed: image_size >= 32")
  return {k: resolved[k] for k in INPUT_FIELDS}


# ------------------------------------------------------------------------------- validation

def max_relative_difference(ours: np.ndarray, reference: np.ndarray) -> float:
  """max |ours - reference| over max |reference|: the largest error relative to the scale."""
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return float(np.max(np.abs(ours - reference)) / max(float(np.max(np.abs(reference))), 1e-30))


def compare(imported: Imported | hf_text.TextImport, reference_path: str) -> dict[str, float]:
  """{output: max_relative_difference} of the model against a reference file: an .npz holding
  the PyTorch input (`inputs`, NCHW float32, as normalized for the model) and the PyTorch
  model's `logits` and/or pooled `features` on it. For a CLIP: `features` are the image
  embeddings of `inputs` (open_clip's encode_image), `text_features` those of `tokens` (int,
  (N, T), encode_text); either pair may be left out. For a text model: `ids`, `mask` and
  `hidden_states` and/or `pooled` (nmjax.convert.hf_text.reference_outputs)."""
  try:
    arrays = features_lib.npz_arrays(reference_path)
  except (OSError, ValueError) as e:
    raise DataError(f"reference file {reference_path} cannot be read as .npz"
                    f" ({type(e).__name__})") from None
  if isinstance(imported, hf_text.TextImport):
    return {key: max_relative_difference(ours, theirs) for key, (ours, theirs)
            in hf_text.reference_outputs(imported, arrays, reference_path).items()}
  name = next((k for k in REFERENCE_INPUTS if k in arrays), None)
  images = None
  channels = (1, 3) if is_clip(imported.arch) else (3,)
  if name is not None and arrays[name].ndim == 4 and arrays[name].shape[1] in channels:
    images = jnp.asarray(np.transpose(arrays[name], (0, 2, 3, 1)), jnp.float32)
  if is_clip(imported.arch):
    ours = _clip_outputs(imported, images, arrays.get("tokens"))
  else:
    ours = {}
    if images is not None:
      apply = jax.jit(lambda v, x: imported.model.apply(v, x, train=False))
      logits, features = apply(imported.variables, images)
      ours = {"logits": np.asarray(logits), "features": np.asarray(features)}
  outputs = [k for k in ours if k in arrays]
  if not outputs:
    wanted = ("`inputs` (N, C, H, W) and `features`, and/or `tokens` (N, T) and"
              " `text_features`" if is_clip(imported.arch) else
              "`inputs` (N, 3, H, W) and `logits` and/or `features`")
    raise DataError(f"reference file {reference_path} must hold {wanted}; it holds"
                    f" {', '.join(arrays) or 'nothing'}")
  differences = {}
  for key in outputs:
    if arrays[key].shape != ours[key].shape:
      raise DataError(f"reference file {reference_path}: {key} is {arrays[key].shape}, the"
                      f" imported model gives {ours[key].shape}")
    differences[key] = max_relative_difference(ours[key], arrays[key])
  return differences


def _clip_outputs(imported: Imported, images: jax.Array | None,
                  tokens: np.ndarray | None) -> dict[str, np.ndarray]:
  model, variables = imported.model, imported.variables
  ours = {}
  if images is not None:  # Jitted: one program, not one dispatch per operation.
    encode = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))
    ours["features"] = np.asarray(encode(variables, images))
  if tokens is not None and tokens.ndim == 2:
    encode = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))
    ours["text_features"] = np.asarray(encode(variables, jnp.asarray(tokens, jnp.int32)))
  return ours


# --------------------------------------------------------------------------------- workdir

def _same_import(saved: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
  keys = ("source_sha256", "arch", "model", "model_options", "num_classes", "input")
  return all(saved.get(k) == record.get(k) for k in keys)


def save_workdir(workdir: str, record: dict[str, Any], imported: Imported | hf_text.TextImport,
                 files: Mapping[str, bytes] | None = None) -> bool:
  """Writes an imported model as a pre-training workdir: `files` ({path under the workdir:
  bytes}, e.g. a text model's tokenizer), WORKDIR/config.json (`record`) and an orbax
  checkpoint of step 0 under WORKDIR/checkpoints (params and batch_stats), which
  nmjax.encoder.load restores like a trained one. False (nothing written) when the workdir
  already holds this import; ConfigError when it holds anything else."""
  steps = checkpoint.saved_steps(workdir)
  path = nmjax_io.join(workdir, "config.json")
  if steps:
    try:
      saved = json.loads(nmjax_io.read_text(path))
    except (OSError, ValueError):
      saved = {}
    if isinstance(saved, dict) and _same_import(saved, json.loads(json.dumps(record))):
      return False
    raise ConfigError(f"--workdir={workdir} already holds checkpoints (steps"
                      f" {', '.join(map(str, steps))}) of another model; pass a new --workdir")
  # The files, then config.json: a kill before the checkpoint commits leaves a workdir that the
  # evaluation jobs refuse (no checkpoint) and that this job writes again.
  for name, data in (files or {}).items():
    target = nmjax_io.join(workdir, name)
    nmjax_io.makedirs(os.path.dirname(target))
    nmjax_io.write_bytes(target, data)
  nmjax_io.write_json(path, record)
  state = {"params": imported.variables["params"],
           "batch_stats": imported.variables.get("batch_stats", {})}
  mngr = checkpoint.manager(workdir, max_to_keep=1)
  try:
    checkpoint.save(mngr, 0, state, {"source": record.get("source"),
                                     "source_sha256": record.get("source_sha256")})
    mngr.wait_until_finished()
  finally:
    mngr.close()
  return True

