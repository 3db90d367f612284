r"""The embedded CLIP study: caption noise in contrastive pre-training, measured downstream.

  .venv/bin/python main.py --config configs/study_clip.py --workdir runs/study_clip
  .venv/bin/python main.py --config configs/study_clip.py:smoke --workdir /tmp/study_clip_smoke

For each seed in config.seeds and each caption-noise ratio r in config.noise_ratios: pre-train the
small two-tower CLIP (clip_small, nmjax/models/clip_model.py) on Fashion-MNIST image-caption
pairs (captions templated over the class names, nmjax/data/image_text.py) in which exactly r of
the pairs carry another pair's caption (config.pretrain.*, the same seed and schedule for every
r); then, over the frozen image embeddings, zero-shot classification with the text tower, lp, mlp
and nmtune on every embedded task, and SVE/LSVR of each task's test features. The same report,
stage reuse and kill-safe resume as the supervised study (configs/default.py; nmjax/jobs/study.py).
More in docs/clip.md.

Overrides as there, e.g. --config.noise_ratios=0,0.3 --config.seeds=0,1
  --config.pretrain.num_epochs=10 --config.nmtune.zeroshot_templates=imagenet
"""

from nmjax.config import clip_experiment, parse_arg, tuning_fields


def get_config(arg: str | None = None):
  args = parse_arg(arg, smoke=False)
  from ml_collections import ConfigDict
  config = ConfigDict()
  config.job = "study"
  config.pretrain_job = "pretrain_clip"       # Caption noise (nmjax/jobs/pretrain_clip.py).
  config.noise_ratios = "0,0.1,0.3"           # Caption-noise ratios, comma-separated.
  config.seeds = "0"
  config.methods = "zeroshot,lp,mlp,nmtune"
  config.tasks = "embedded"
  config.spectrum_tasks = "fashion_mnist,fashion_mnist_c"
  config.data_dir = ""
  # A job-array task: list (the stage names), one name or index (that point), render (the
  # report of what is finished); empty: the whole sweep, then the report.
  config.stage = ""
  config.tune_grid = ""                       # NMTune's weights as config.nmtune sets them.
  config.tune_val_fraction = 0.2
  # Side by side (one program) applies to supervised pre-training; CLIP's stages run in turn.
  config.vmap_seeds = False
  config.smoke = bool(args.smoke)  # The report says its numbers test the plumbing only.
  config.pretrain = clip_experiment(dataset="fashion_mnist", model="clip_small",
                                    variant="smoke" if args.smoke else "embedded")
  if not args.smoke:
    # Sized for a study of minutes on 2 CPU cores: 20,000 pairs, 3 epochs.
    config.pretrain.max_train_examples = 20000
    config.pretrain.num_epochs = 3.0
  config.pretrain.eval_every_epochs = 0  # Held-out retrieval once, after the last step.
  config.nmtune = tuning_fields(smoke=args.smoke)
  # Zero-shot prompts: "simple" ("a photo of a {}.") or "imagenet" (the CLIP paper's 80).
  config.nmtune.zeroshot_templates = "simple"
  if args.smoke:
    config.noise_ratios = "0,0.3"
    config.tasks = config.spectrum_tasks = "fashion_mnist,digits"
  return config
