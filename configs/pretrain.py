r"""Pre-train a model on an image dataset with controlled label noise.

Command (2-core CPU, Fashion-MNIST, small ResNet, 5 epochs):
  .venv/bin/python main.py --config configs/pretrain.py:dataset=fashion_mnist,noise=0.2 \
      --workdir runs/pretrain_fmnist_n0.2

Arguments after ':' (comma separated): dataset=NAME, model=NAME, noise=RATIO, noise_type=TYPE,
seed=INT, epochs=FLOAT, smoke (a seconds-long run on a subset, for tests).
Any field can also be overridden as --config.FIELD=VALUE (e.g. --config.num_train_steps=200).

Several devices need nothing extra (the batch is split over all of them). Several processes:
  on a TPU pod slice, the same command on every host with --config.distributed=auto;
  elsewhere, on each of N hosts: --config.distributed=explicit
      --config.coordinator_address=HOST0:PORT --config.num_processes=N --config.process_id=I
SIGTERM saves a checkpoint after the current step and exits 0; the same command resumes.

Expected on a 2-core CPU (measured 2026-11-27, see README): about 4.5 minutes wall (48 s per
epoch at ~1,350 img/s); noise=0.0 reaches 90.2% test accuracy after 5 epochs; noise=0.4 reaches
86.0%, with train accuracy 85.1% against the clean labels and 51.8% against the noisy ones.
"""

from nmjax.config import add_run_fields, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, dataset="fashion_mnist", model="resnet_small", noise=0.0,
                   noise_type="symmetric", seed=0, epochs=5.0, smoke=False)
  from ml_collections import ConfigDict
  config = ConfigDict()
  config.job = "pretrain"
  config.dataset = args.dataset
  config.model = args.model
  config.noise_ratio = args.noise
  config.noise_type = args.noise_type  # symmetric | pairflip
  config.seed = args.seed

  config.num_epochs = args.epochs
  config.num_train_steps = -1  # > 0 wins over num_epochs.
  config.batch_size = 128      # Global, over all devices and processes.
  config.eval_batch_size = 512
  config.max_train_examples = -1  # > 0 trains on the first N records only (smoke runs).
  config.max_test_examples = -1

  config.optimizer = "sgd"     # sgd (momentum) | adamw
  config.learning_rate = 0.1   # Peak, after warm-up.
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 5e-4   # Kernels only (not BatchNorm or biases).
  config.warmup_epochs = 0.5
  config.label_smoothing = 0.0
  config.crop_padding = 2      # Random crop after zero padding by this many pixels.
  config.flip = True           # Horizontal flip, applied only where the dataset allows it.
  config.dtype = "float32"     # Compute dtype: float32 | bfloat16 (params stay float32).

  config.eval_every_epochs = 1  # Test accuracy every N epochs (0: never) and after the last step.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 500
  config.max_to_keep = 3
  add_run_fields(config)       # data_dir, record_examples, mesh, distributed, ...

  if args.smoke:
    config.num_train_steps = 12
    config.batch_size = 32
    config.eval_batch_size = 80
    config.max_train_examples = 160
    config.max_test_examples = 250
    config.warmup_epochs = 0.0
    config.log_every_steps = 4
    config.checkpoint_every_steps = 4
  return config
