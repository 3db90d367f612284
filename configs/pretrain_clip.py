r"""Pre-train a CLIP (image and text towers) on image-text pairs with controlled caption noise.

Defaults: the reference implementation's YFCC15M recipe with the batch fixed across noise
ratios: open_clip's RN50 (plain GELU), AdamW lr 5e-4, weight decay 0.2, b1 0.9, b2 0.999, eps 1e-8,
10,000 warm-up steps then cosine, 32 epochs, global batch 256, bf16 compute. A clean run on
YFCC15M should land near open_clip's published RN50/YFCC15M figure: 32.4% ImageNet zero-shot.

Commands:
  embedded pairs (Fashion-MNIST images, templated captions; small towers; minutes on a CPU):
    .venv/bin/python main.py --config configs/pretrain_clip.py:embedded,noise=0.3 \
        --workdir runs/clip_fmnist_n0.3
  YFCC15M / CC3M / CC12M shards as img2dataset writes them, converted once:
    .venv/bin/python -m nmjax.data.image_text convert --output $DATA/yfcc15m '/shards/*.tar'
    .venv/bin/python main.py --config configs/pretrain_clip.py:noise=0.1 \
        --config.dataset=array_record:$DATA/yfcc15m --workdir gs://.../clip_rn50_n0.1
  TPU pod slice: the same command on every host with --config.distributed=auto.
  Multi-GPU host: the command as it is (the batch is split over all local GPUs); several hosts:
    --config.distributed=explicit --config.coordinator_address=HOST0:PORT
    --config.num_processes=N --config.process_id=I on host I.

Arguments after ':' (comma separated): dataset=NAME, model=NAME, noise=RATIO (caption noise:
exactly round(r * N) pairs get another pair's caption), seed=INT, epochs=FLOAT, embedded, smoke.
Any field can also be overridden as --config.FIELD=VALUE. SIGTERM saves and exits 0; Ctrl-C
saves and exits 130; the same command resumes bitwise. --config.profile_steps=N,M writes a
jax.profiler trace of steps N to M into WORKDIR/profile/ (TensorBoard's Profile tab).
"""

from nmjax.config import clip_experiment, clip_run, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, dataset="", model="", noise=0.0, seed=0, epochs=-1.0, embedded=False,
                   smoke=False)
  variant = "smoke" if args.smoke else "embedded" if args.embedded else ""
  small = bool(variant)
  experiment = clip_experiment(
      dataset=args.dataset or ("fashion_mnist" if small else "array_record:yfcc15m"),
      model=args.model or ("clip_small" if small else "clip_rn50"), variant=variant)
  if args.epochs > 0:
    experiment.num_epochs = args.epochs
  return clip_run(experiment, caption_noise=args.noise, seed=args.seed)
