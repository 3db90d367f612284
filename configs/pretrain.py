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
Ctrl-C does the same and exits 130; a second Ctrl-C stops at once.

Writes DIR/config.json, DIR/plan.json, the orbax checkpoints under DIR/checkpoints/, and the
metrics in DIR/metrics.jsonl and DIR/tb/ (TensorBoard); DIR may be a bucket (gs://...).
--config.profile_steps=N,M writes a jax.profiler trace of steps N to M into DIR/profile/
(TensorBoard's Profile tab). More in docs/pretrain.md; its speed in docs/performance.md.
"""

from nmjax.config import parse_arg, pretrain_experiment, pretrain_run


def get_config(arg: str | None = None):
  args = parse_arg(arg, dataset="fashion_mnist", model="resnet_small", noise=0.0,
                   noise_type="symmetric", seed=0, epochs=5.0, smoke=False)
  experiment = pretrain_experiment(dataset=args.dataset, model=args.model,
                                   noise_type=args.noise_type, epochs=args.epochs,
                                   smoke=args.smoke)
  return pretrain_run(experiment, noise_ratio=args.noise, seed=args.seed)
