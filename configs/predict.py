r"""Applies a saved head (a job's heads/<task>/<method>/, or head.save's folder) to features.

Features file (.npz with features (N, D); labels (N,) optional, for the accuracy):
  .venv/bin/python main.py --config configs/predict.py \
      --config.head=runs/nmtune_files/heads/nmtune --config.features=TEST.npz \
      --workdir runs/predict_nmtune
Images through the encoder the head was fitted on (encoder + head = a classifier): a task's test
split(s), encoded with the checkpoint's encoder (features cached as the transfer job's are):
  .venv/bin/python main.py --config configs/predict.py \
      --config.head=runs/transfer_fmnist_n0.2/heads/digits/ridge \
      --config.checkpoint=runs/pretrain_fmnist_n0.2 --config.task=digits \
      --workdir runs/predict_digits
Writes DIR/predictions.jsonl (one line per example: id = row index, predicted class, label when
known) or, with --config.output=npz, DIR/predictions.npz (ids, predicted, logits, labels), and
DIR/predict.json (the head, the input, the count and the accuracy when labels are present; the
accuracy is printed too).

Arguments after ':' (comma separated): output=jsonl|npz, smoke (the smoke configs' feature cap:
at most 400 examples per split, as configs/transfer.py:smoke encodes them). Every field is also
--config.FIELD=VALUE.
"""

from ml_collections import ConfigDict

from nmjax.config import add_extraction_fields, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, output="jsonl", smoke=False)
  config = ConfigDict()
  config.job = "predict"
  config.head = ""          # A saved head's folder (head.json + variables.npz).
  config.features = ""      # A features file (.npz: features, labels optional), or:
  config.checkpoint = ""    # the pre-training (or import) workdir of the head's encoder,
  config.step = -1          # its checkpoint step (-1: the latest),
  config.task = ""          # and the nmjax.tasks name whose test split(s) are predicted.
  config.data_dir = ""      # Empty: $NMJAX_DATA_DIR or ~/.cache/nmjax.
  config.output = args.output  # jsonl (predictions.jsonl) | npz (predictions.npz)
  add_extraction_fields(config, batch_field="batch_size", smoke=args.smoke)
  return config
