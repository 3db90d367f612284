r"""The embedded study, main.py's default job: label noise in pre-training, measured downstream.

  .venv/bin/python main.py                    # this config; the workdir defaults to runs/study
  .venv/bin/python main.py --config configs/default.py:smoke --workdir /tmp/study_smoke

For each seed in config.seeds and each noise ratio r in config.noise_ratios: pre-train the small
ResNet on Fashion-MNIST with symmetric label noise on exactly r of the images used
(config.pretrain.*, the same seed and schedule for every r; a regime that memorizes part of the
noise), then fit lp, mlp and nmtune over its frozen features on the study's tasks (source, ID,
OOD, far; nmjax/tasks.py group "study") and compute SVE and LSVR of each task's test features
(config.nmtune.*; mlp and nmtune on two cached augmented views). NMTune's weights are chosen
once among config.tune_grid on the r = 0 encoder's validation splits (the tune stage), then
frozen. Stages already done in the workdir are reused: a run started again after a crash or a
kill continues where it stopped, and a run of a finished study only renders the report again.
Writes WORKDIR/results.jsonl, results.md, accuracy_vs_noise.png, spectra.png,
spectral_vs_noise.png and tb/ (TensorBoard).

Overrides, e.g.: --config.noise_ratios=0,0.05,0.1,0.2,0.3 --config.seeds=0,1,2
  --config.pretrain.num_epochs=30 --config.pretrain.max_train_examples=5000
  --config.nmtune.epochs=20 --config.tune_grid= (config.nmtune's weights) --config.methods=lp,mlp

As a job array (docs/study.md): --config.stage=list prints the points, --config.stage=NAME (or
an index) runs one point in its own process on a shared workdir, --config.stage=render the report;
every task takes the same --config.* flags (a task with others is refused before it trains).

The design and the default run's results: docs/study.md; its time: docs/performance.md.
"""

from nmjax.config import parse_arg, pretrain_experiment, tuning_fields


def get_config(arg: str | None = None):
  args = parse_arg(arg, smoke=False, claims=False)
  from ml_collections import ConfigDict
  config = ConfigDict()
  config.job = "study"
  config.pretrain_job = "pretrain"            # Label noise (supervised pre-training).
  config.noise_ratios = "0,0.1,0.3"          # Comma-separated, each 0 <= r < 1.
  config.seeds = "0,1,2"                      # Comma-separated; each seeds pre-training and tuning.
  # true: the pending pre-training stages train side by side in one jitted program (vmapped over
  # the stacked seeds and ratios: nmjax/train/side_by_side.py); false: one after another.
  config.vmap_seeds = True
  config.methods = "lp,mlp,nmtune"            # Also lp_aug (nmjax/evaluate.py).
  # nmjax/tasks.py names or groups, comma-separated; "study": the source task, two downstream
  # ID tasks, corruption shifts of Fashion-MNIST and MNIST (OOD) and mnist<->digits (far).
  config.tasks = "study"
  config.spectrum_tasks = "fashion_mnist_source,fashion_mnist_test_c"  # Drawn in spectra.png.
  config.data_dir = ""                        # Empty: $NMJAX_DATA_DIR or ~/.cache/nmjax.
  # A job-array task: list (the stage names), one name or index (that point), render (the
  # report of what is finished); empty: the whole sweep, then the report.
  config.stage = ""
  # What every point of the sweep shares; the study sets each stage's noise ratio, seed,
  # checkpoint and tasks (nmjax/jobs/study.py).
  config.pretrain = pretrain_experiment(dataset="fashion_mnist", model="resnet_small",
                                        noise_type="symmetric", epochs=20.0, smoke=args.smoke)
  if not args.smoke:
    # A regime that memorizes part of the noise (docs/study.md: the design): the first 2,500
    # training images (the source task probes the last 5,000), 20 epochs, no augmentation.
    config.pretrain.max_train_examples = 2500
  config.pretrain.crop_padding = 0
  config.pretrain.flip = False
  config.pretrain.eval_every_epochs = 0  # Test accuracy once, after the last step.
  # mlp and nmtune train on two augmented views per image, encoded once (the cached views).
  config.nmtune = tuning_fields(views="cached", smoke=args.smoke)
  config.nmtune.cached_views = 2
  if not args.smoke:
    config.nmtune.epochs = 10  # Over the images: 2 views each (twice a plain epoch's rows).
  # NMTune's weights: chosen once among this grid on a validation split of the r = 0 encoder's
  # train features (the tune stage, nmjax/jobs/study_tune.py), then frozen for every r; empty:
  # config.nmtune's weights as they are.
  config.tune_grid = "cov_weight=0.04,0.4;svd_weight=0.001,0.01"
  config.tune_val_fraction = 0.2
  config.smoke = bool(args.smoke)  # The report says its numbers test the plumbing only.
  if args.claims:
    # Enough seeds for the claims' verdicts (docs/study.md: the claims run).
    config.seeds = "0,1,2,3,4,5,6,7"
  if args.smoke:
    config.noise_ratios = "0,0.3"
    config.seeds = "0"
    config.tasks = config.spectrum_tasks = "digits,mnist_to_digits"
    config.tune_grid = "svd_weight=0.001,0.01"
  return config
