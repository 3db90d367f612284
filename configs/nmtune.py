r"""NMTune over frozen features: lp, mlp and nmtune, from features files or a pre-training
checkpoint (the method: docs/method.md; the job: docs/nmtune.md).

Black-box mode (any features files: .npz with features (N, D) and labels (N,)):
  .venv/bin/python main.py --config configs/nmtune.py --config.train_features=TRAIN.npz \
      --config.test_features=TEST.npz --config.methods=nmtune --workdir DIR
writes one JSON line per method to DIR/results.jsonl (a re-run replaces its rows) and each
fitted head to DIR/heads/<method>/ (nmjax.heads.load reads it back).

Checkpoint mode (2-core CPU, a Fashion-MNIST checkpoint from configs/pretrain.py):
  .venv/bin/python main.py --config configs/nmtune.py \
      --config.checkpoint=runs/pretrain_fmnist_n0.2 --workdir runs/nmtune_fmnist_n0.2
runs lp, mlp and nmtune on the six embedded tasks (three train views, one fit each per method)
and writes DIR/results.jsonl, DIR/results.md and DIR/curves.png. views=features is the quickest;
views=cached and views=online (augmented views encoded once, or in every step) cost more.

Arguments after ':' (comma separated): methods=lp+mlp+nmtune (also lp_aug, and zeroshot on a CLIP
checkpoint), tasks=NAMES (task or group names joined by '+'), views=features|online|cached, smoke
(a seconds-long run). Every field is also --config.FIELD=VALUE, lists comma-separated
(--config.methods=lp,nmtune): the NMTune hyperparameters (epochs, batch_size = rows per step, lr,
weight_decay, mse_weight, cov_weight, svd_weight, svd_topk, mlp_ratio, mlp_layers,
residual_scale_init, seed) and the linear probe's (--config.lp.learning_rate=...). `method`
(method=... after ':' or --config.method=...) is a deprecated alias of methods, read with a note.

A grid of NMTune configurations, trained as one jitted program and chosen on a validation split
carved from train (seeded, stratified; never a test set):
  --config.val_fraction=0.1 --config.grid="svd_weight=0.001,0.01,0.1;cov_weight=0.04,0.4"
(field=v1,v2,... joined by ';', the Cartesian product; fields lr, weight_decay, mse_weight,
cov_weight, svd_weight, svd_topk, residual_scale_init, seed share one program; epochs,
batch_size, mlp_ratio, mlp_layers split it: nmjax/nmtune/grid.py). The nmtune, mlp and lp_aug
methods each train the grid points their method leaves distinct (mlp zeroes the weights: one fit
for a weights grid); lp trains on all of train. Every configuration's line is printed and its
val_accuracy and accuracy kept in the row's grid_results; the row is the chosen one's.
"""

from nmjax.config import parse_arg, tuning_config, tuning_fields


def get_config(arg: str | None = None):
  args = parse_arg(arg, methods="lp+mlp+nmtune", method="", tasks="embedded", views="features",
                   smoke=False)
  config = tuning_config(tuning_fields(views=args.views, smoke=args.smoke), methods=args.methods,
                         tasks=args.tasks, smoke=args.smoke)
  config.method = args.method  # Deprecated alias of methods (the job says so and reads it).
  return config
