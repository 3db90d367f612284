r"""nmjax command line: runs config.job with an ml_collections config.

  python main.py                     # the embedded study (configs/default.py) in runs/study
  python main.py --config configs/pretrain.py:dataset=fashion_mnist,noise=0.2 --workdir DIR
  python main.py --config configs/pretrain.py --config.num_train_steps=200 --workdir DIR

Errors in the config or the data print one line naming the field (or file) and exit with code 2.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"), "Config file (path[:args]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go"
                               " (default: runs/<job>).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every file it writes at INFO and TFDS warns while probing for datasets: keep the
    # terminal for nmjax's own lines (--verbosity=0 brings the library logs back).
    logging.set_verbosity(logging.ERROR)
  from nmjax import jobs
  from nmjax.errors import NmjaxError
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", str(config.get("job", "job")))
  try:
    jobs.run(config, workdir)
  except NmjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
