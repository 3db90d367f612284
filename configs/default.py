r"""The embedded study, main.py's default job: label noise in pre-training, measured downstream.

  .venv/bin/python main.py                    # this config; the workdir defaults to runs/study
  .venv/bin/python main.py --config configs/default.py:smoke --workdir /tmp/study_smoke

For each seed in config.seeds and each noise ratio r in config.noise_ratios: pre-train the small
ResNet on Fashion-MNIST with symmetric label noise r (config.pretrain.*, the same seed and
schedule for every r), then fit lp, mlp and nmtune over its frozen features on every embedded task
and compute SVE and LSVR of each task's test features (config.nmtune.*). Stages already done in
the workdir are reused: a run started again after a crash or a kill continues where it stopped,
and a run of a finished study only renders the report again. Writes WORKDIR/results.jsonl,
results.md, accuracy_vs_noise.png, spectra.png, spectral_vs_noise.png and tb/ (TensorBoard).

Overrides, e.g.: --config.noise_ratios=0,0.3 --config.seeds=0,1,2 (mean +- std over seeds)
  --config.pretrain.num_epochs=5 --config.pretrain.max_train_examples=-1 (all 60,000 images)
  --config.nmtune.epochs=10 --config.nmtune.cov_weight=0.1 --config.methods=lp,lp_aug,mlp,nmtune

As a job array (README): --config.stage=list prints the points, --config.stage=NAME (or an
index) runs one point in its own process on a shared workdir, --config.stage=render the report.

Measured on this project's 2-core CPU machine (README): the whole default study 3.5-5 minutes
wall from a fresh workdir (2026-12-02: ID avg lp 82.74 / mlp 91.57 / nmtune 91.56 at r=0); the
smoke variant about 40 s.
"""

from nmjax.config import parse_arg, pretrain_experiment, tuning_fields


def get_config(arg: str | None = None):
  args = parse_arg(arg, smoke=False)
  from ml_collections import ConfigDict
  config = ConfigDict()
  config.job = "study"
  config.noise_ratios = "0,0.05,0.1,0.2,0.3"  # Comma-separated, each 0 <= r < 1.
  config.seeds = "0"                          # Comma-separated; each seeds pre-training and tuning.
  config.methods = "lp,mlp,nmtune"            # Also lp_aug (nmjax/evaluate.py).
  config.tasks = "embedded"                   # nmjax/tasks.py names or groups, comma-separated.
  config.spectrum_tasks = "fashion_mnist,fashion_mnist_c"  # One ID and one OOD task: spectra.png.
  config.data_dir = ""                        # Empty: $NMJAX_DATA_DIR or ~/.cache/nmjax.
  # A job-array task: list (the stage names), one name or index (that point), render (the
  # report of what is finished); empty: the whole sweep, then the report.
  config.stage = ""
  # What every point of the sweep shares; the study sets each stage's noise ratio, seed,
  # checkpoint and tasks (nmjax/jobs/study.py).
  config.pretrain = pretrain_experiment(dataset="fashion_mnist", model="resnet_small",
                                        noise_type="symmetric", epochs=3.0, smoke=args.smoke)
  if not args.smoke:
    # Sized for 10 minutes on 2 cores (README): the first 20,000 training images, 3 epochs.
    config.pretrain.max_train_examples = 20000
  config.pretrain.eval_every_epochs = 0  # Test accuracy once, after the last step.
  config.nmtune = tuning_fields(smoke=args.smoke)
  if args.smoke:
    config.noise_ratios = "0,0.3"
    config.tasks = config.spectrum_tasks = "digits,mnist->digits"
  return config
