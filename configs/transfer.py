r"""Transfer evaluation of a pre-trained (frozen) encoder: linear probes and spectral metrics.

Command (2-core CPU, a Fashion-MNIST checkpoint from configs/pretrain.py, the embedded tasks):
  .venv/bin/python main.py --config configs/transfer.py \
      --config.checkpoint=runs/pretrain_fmnist_n0.2 --workdir runs/transfer_fmnist_n0.2

Arguments after ':' (comma separated): tasks=NAMES (task or group names joined by '+', e.g.
tasks=mnist+digits), methods=lp+ridge (also zeroshot on a CLIP checkpoint), smoke (a seconds-long
run: two small tasks, 3 LP epochs). Any field can also be overridden as --config.FIELD=VALUE, lists
comma-separated, e.g. --config.tasks=embedded_ood,mnist_to_digits or --config.probe.num_epochs=10.
Tasks and groups: see nmjax/tasks.py (embedded, embedded_id, embedded_ood, paper, paper_id,
paper_ood, or single names like mnist_to_digits; mnist->digits is read as mnist_to_digits).

Writes DIR/results.jsonl (one line per task and method), DIR/results.md (ID and OOD averages and
a per-task table) and DIR/spectra.png; features are cached beside the checkpoint, under
CHECKPOINT/features/ (DIR/features/ when it is not writable), where every later transfer or NMTune
run on the same encoder reuses them. More in docs/transfer.md.
"""

from nmjax.config import add_encoder_fields, add_extraction_fields, parse_arg, probe_fields


def get_config(arg: str | None = None):
  args = parse_arg(arg, tasks="embedded", methods="lp+ridge", smoke=False)
  from ml_collections import ConfigDict
  config = ConfigDict()
  config.job = "transfer"
  config.methods = args.methods.replace("+", ",")  # lp (reference AdamW probe) | ridge
  config.probe = probe_fields()
  config.spectral_center = "row"  # row (the reference's) | feature | none
  # Method zeroshot (a CLIP encoder): "imagenet" (the CLIP paper's 80 prompts) or "simple".
  config.zeroshot_templates = "imagenet"
  add_encoder_fields(config, tasks=args.tasks, smoke=args.smoke)
  add_extraction_fields(config, batch_field="batch_size", smoke=args.smoke)
  if args.smoke:
    with config.probe.unlocked():
      config.probe.num_epochs = 3
  return config
