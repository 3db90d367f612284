r"""Pre-train ResNet-50 (or ViT-S/16) on ImageNet-1k (TFDS imagenet2012) with label noise.

The data: TFDS imagenet2012 prepared by you with its manual-download path, as array_record,
under <data_dir>/tfds (data_dir: --config.data_dir, else $NMJAX_DATA_DIR, else ~/.cache/nmjax):
  # ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (image-net.org) in MANUAL_DIR
  tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR/tfds \
      --file_format=array_record
JPEGs are decoded, randomly resized-cropped (8-100% of the area, aspect 3/4-4/3) to 224 and
flipped on the host by grain worker processes (config.data_workers per host, nmjax/data/
imagenet.py); evaluation uses the central 87.5% square resized to 224, on the validation split.

Arguments after ':' (comma separated): model=resnet50|vit_s16, noise=RATIO, noise_type=TYPE,
seed=INT, epochs=FLOAT, batch=INT (global), label_smoothing=FLOAT, nesterov=BOOL,
dtype=bfloat16|float32, image_size=INT, smoke (a seconds-long CPU run on a tiny subset at a small
image size, for tests). Any field can be overridden with --config.FIELD=VALUE.

One host with several GPUs (one process drives every local GPU through the device mesh; give
the input pipeline most of the host's cores):
  python main.py --config configs/pretrain_imagenet.py:noise=0.1 \
      --config.data_workers=$(($(nproc) - 4)) --workdir /shared/runs/in1k_r50_n0.1
A TPU v3-8 / v4-8 (one host) runs the same command. A multi-host TPU pod slice (e.g. v4-32), or
GPU nodes under SLURM/OpenMPI, start one process per host with jax.distributed auto-detection;
the workdir must be on a filesystem every host sees or in a bucket (--workdir gs://BUCKET/RUN;
checkpoints are written collectively) and every host needs the prepared data:
  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command="cd nmjax && \
      .venv/bin/python main.py --config configs/pretrain_imagenet.py:noise=0.1 \
      --config.distributed=auto --config.data_dir=/mnt/data --workdir /mnt/shared/in1k_r50_n0.1"
  (GPU nodes elsewhere: --config.distributed=explicit --config.coordinator_address=HOST:PORT
   --config.num_processes=N --config.process_id=I, one process per node.)

Recipe (model=resnet50, the standard one): SGD momentum 0.9 (nesterov=true optional), peak lr
0.1 x batch/256 (0.4 at the default global batch 1024) after 5 warm-up epochs, cosine decay to 0,
weight decay 1e-4 on kernels only (not BatchNorm or biases), label smoothing 0 (0.1 optional),
90 epochs, bfloat16 compute with float32 parameters and optimizer state (dtype=float32 on CPU).
Expected: flax's ImageNet example (the public JAX anchor for this recipe) reports 76-77% top-1
for ResNet-50 after 90-100 epochs at noise=0; label noise lowers it (measure; the paper's
noisy-pretraining study is what this config reproduces).

Recipe (model=vit_s16, a typical AdamW recipe for ViT-S/16 from scratch on ImageNet-1k, as in
big_vision's plain-ViT baseline and DeiT): AdamW b1 0.9, b2 0.999, peak lr 1e-3 x batch/1024,
decoupled weight decay 0.1 (optax multiplies it by the lr, as PyTorch's AdamW does) on kernels,
8 warm-up epochs (about 10k steps at batch 1024), cosine to 0, label smoothing 0.1, 90 epochs.
Those public recipes also use RandAugment and Mixup (and gradient clipping at norm 1), which nmjax
does not implement: expect clearly less than the high-70s top-1 they typically report; no figure
from nmjax is claimed here.

Runtime: at a ResNet-50 rate of 2,500 images/s per GPU, one epoch (1.28M images) takes
1.28M / 2,500 = 512 s and 90 epochs about 13 GPU-hours. The input pipeline needs several CPU cores
(data_workers) per GPU: benchmarks/input.py measures its images per CPU-second, and
docs/performance.md says how many cores feed one GPU.
"""

from nmjax.config import ConfigError, parse_arg, pretrain_experiment, pretrain_run

_MODELS = ("resnet50", "vit_s16")


def get_config(arg: str | None = None):
  args = parse_arg(arg, model="resnet50", noise=0.0, noise_type="symmetric", seed=0, epochs=90.0,
                   batch=1024, label_smoothing=-1.0, nesterov=False, dtype="bfloat16",
                   image_size=224, smoke=False)
  if args.model not in _MODELS:
    raise ConfigError(f"config argument model={args.model!r} is unknown; allowed: "
                      f"{', '.join(_MODELS)}")
  vit = args.model == "vit_s16"
  config = pretrain_experiment(dataset="imagenet2012", model=args.model,
                               noise_type=args.noise_type, epochs=args.epochs, smoke=False)
  config.input_pipeline = "imagenet"  # JPEG decode + random-resized crop in grain workers.
  config.image_size = args.image_size
  config.crop_padding = 0      # Read by the default pipeline only.
  config.eval_split = "validation"   # imagenet2012's test split has no labels.
  config.data_workers = 8      # grain worker processes per host; the batches do not depend on it.

  config.batch_size = args.batch  # Global, over all devices and processes.
  config.eval_batch_size = 1024
  if vit:
    config.optimizer = "adamw"
    config.learning_rate = 1e-3 * args.batch / 1024
    config.weight_decay = 0.1
    config.warmup_epochs = 8.0
    default_smoothing = 0.1
  else:
    config.optimizer = "sgd"
    config.learning_rate = 0.1 * args.batch / 256
    config.weight_decay = 1e-4  # Kernels only (not BatchNorm or biases).
    config.warmup_epochs = 5.0
    default_smoothing = 0.0
  config.momentum = 0.9        # SGD only.
  config.nesterov = args.nesterov
  config.label_smoothing = default_smoothing if args.label_smoothing < 0 else args.label_smoothing
  config.flip = True
  config.dtype = args.dtype    # Compute dtype: bfloat16 on accelerators, float32 on CPU.
  config.checkpoint_every_steps = 1000

  if args.smoke:
    _shrink_for_smoke(config, args)
  return pretrain_run(config, noise_ratio=args.noise, seed=args.seed)


def _shrink_for_smoke(config, args) -> None:
  """A CPU run of a few steps on a tiny subset (tests use a synthetic imagenet2012)."""
  vit = args.model == "vit_s16"
  config.image_size = 32 if args.image_size == 224 else args.image_size
  config.dtype = "float32"
  config.num_train_steps = 2
  config.batch_size = 16
  config.eval_batch_size = 16
  config.max_train_examples = 64
  config.max_test_examples = 24
  config.learning_rate = (1e-3 if vit else 0.1) * 16 / (1024 if vit else 256)
  config.warmup_epochs = 0.0
  config.data_workers = 0
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
