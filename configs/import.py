r"""Import a PyTorch or safetensors checkpoint (timm / torchvision ResNet-18/50, timm ViT-S/16 or
ViT-B/16, OpenAI / open_clip CLIP RN50 or ViT-B/16), or a Hugging Face text model folder (BERT,
RoBERTa, GPT-2), as an nmjax pre-training workdir, which configs/transfer.py and
configs/nmtune.py then take as --config.checkpoint=DIR like one nmjax trained (a CLIP's as a
CLIP workdir: methods lp and zeroshot, NMTune; a text model's as a text encoder).

Commands (the reference's noisy timm ResNet-50, 10% symmetric ImageNet noise; its open_clip RN50
pre-trained on YFCC15M with 10% caption noise; OpenAI's RN50 download):
  .venv/bin/python main.py --config configs/import.py \
      --config.source=resnet50_noise_10/model.pth.tar --config.arch=resnet50 \
      --config.dataset=imagenet2012 --config.noise_ratio=0.1 --workdir runs/import_r50_n0.1
  .venv/bin/python main.py --config configs/import.py \
      --config.source=yfcc15m_noise_10/epoch_32.pt --config.arch=clip_rn50 \
      --config.dataset=yfcc15m --config.noise_ratio=0.1 --workdir runs/import_clip_n0.1
  .venv/bin/python main.py --config configs/import.py --config.source=RN50.pt \
      --config.arch=clip_rn50_quickgelu --config.dataset=openai_wit --workdir runs/openai_rn50
A Hugging Face folder (transformers' save_pretrained: config.json, model.safetensors or
pytorch_model.bin, tokenizer files), its architecture read from its config.json:
  .venv/bin/python main.py --config configs/import.py --config.source=bert-base-uncased \
      --config.dataset=bookcorpus_wikipedia --workdir runs/import_bert_base

Arguments after ':' (comma separated): source=FILE, arch=NAME (resnet18, resnet50, vit_s16,
vit_b16, clip_rn50, clip_rn50_quickgelu, clip_vit_b16, clip_vit_b16_quickgelu, clip_small).
Fields (--config.FIELD=VALUE):
  source, arch         the file (.safetensors, .pth, .pth.tar, .pt, .bin; TorchScript archives
                       such as OpenAI's RN50.pt too) and its architecture; or a Hugging Face
                       folder of model_type bert, roberta or gpt2, with arch left empty.
  pooling              a text model's pooled vector: cls, mean or last; unset, cls for BERT and
                       RoBERTa, last for GPT-2 (the evaluation jobs may choose another).
  quick_gelu           CLIP only: QuickGELU (OpenAI's weights, open_clip's *-quickgelu) or exact
                       GELU (open_clip's RN50 / ViT-B-16); unset, the arch name says it (the
                       `_quickgelu` names: QuickGELU; the others: GELU). A flag the name
                       contradicts is refused, so is a TorchScript archive whose modules say
                       otherwise; a plain state dict cannot say (nmjax/convert/clip_layouts.py).
  dataset, noise_ratio, noise_type
                       what the model was pre-trained on: only written into the reports (a
                       CLIP's noise_ratio is its caption noise). For clip_small, the embedded
                       set it was trained on (its input shape and normalisation).
  input.image_size, input.crop_pct, input.interpolation, input.mean, input.std
                       the evaluation transform (mean/std in 0..1 units as in timm); unset, a
                       Hugging Face config.json beside the file (timm's pretrained_cfg) or the
                       architecture's default: ResNets 224, crop 0.95, bicubic, ImageNet
                       mean/std (timm's RSB recipe, the reference's); ViTs crop 0.9, bicubic,
                       mean/std 0.5 (timm's augreg). Torchvision's own ResNet weights want
                       --config.input.crop_pct=0.875 --config.input.interpolation=bilinear.
                       CLIPs: 224, crop 1.0 (short side resized to 224), bicubic, CLIP's mean
                       and std; only crop_pct and interpolation may change.
  reference            ACTS.npz: `inputs` (N, 3, H, W) as fed to PyTorch, and the PyTorch
                       model's `logits` and/or pooled `features`; the job prints the largest
                       relative difference and refuses the import above reference_tolerance.
                       A CLIP's: `features` = encode_image(inputs), and/or `tokens` (N, 77)
                       with `text_features` = encode_text(tokens); the surest check of the
                       QuickGELU choice. A text model's: `ids` and `mask` (N, L) and
                       transformers' `hidden_states` (last_hidden_state, compared at real
                       tokens) and/or `pooled`.
  trust_pickle         let torch unpickle arbitrary objects, and torch.jit.load a TorchScript
                       archive, running its code (only for files you trust).
Writes DIR/config.json (these fields, the file's sha256, the model's layout), DIR/plan.json and
the orbax checkpoint DIR/checkpoints/0 (a text model's: also text_config and pooling in
config.json, its tokenizer files in DIR/tokenizer/); --dry_run prints the checked plan and
writes nothing. More in docs/import.md and docs/text.md.
"""

import ml_collections

from nmjax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, source="", arch="")
  config = ml_collections.ConfigDict()
  config.job = "import"
  config.source = args.source
  config.arch = args.arch             # Empty for a Hugging Face folder (its config.json says).
  config.pooling = ml_collections.config_dict.placeholder(str)  # Text: None = the family's.
  config.quick_gelu = ml_collections.config_dict.placeholder(bool)  # CLIP: None = the name's.
  config.dataset = "unknown"          # What it was pre-trained on (reports only).
  config.noise_ratio = ml_collections.config_dict.placeholder(float)
  config.noise_type = "symmetric"
  config.input = ml_collections.ConfigDict()
  config.input.image_size = ml_collections.config_dict.placeholder(int)
  config.input.crop_pct = ml_collections.config_dict.placeholder(float)
  config.input.interpolation = ml_collections.config_dict.placeholder(str)
  config.input.mean = ml_collections.config_dict.placeholder(tuple)
  config.input.std = ml_collections.config_dict.placeholder(tuple)
  config.reference = ""               # ACTS.npz to compare against (empty: no comparison).
  config.reference_tolerance = 1e-3   # Largest relative difference accepted.
  config.trust_pickle = False
  return config
