r"""nmjax command line: runs config.job with an ml_collections config.

  python main.py                     # the embedded study (configs/default.py) in runs/study
  python main.py --config configs/pretrain.py:dataset=fashion_mnist,noise=0.2 --workdir DIR
  python main.py --config configs/pretrain.py --config.num_train_steps=200 --workdir DIR

Errors in the config or the data, a config flag that does not parse, a full disk or a path that
cannot be written print one line naming the field (or file) and exit with code 2 (nmjax/cli.py).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")
# No default here: config_flags would load it (and apply the --config.* overrides) while this
# module is imported, where a typo is a traceback; parse_flags passes the default instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (path[:args]; default: configs/default.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go"
                               " (default: runs/<job>).")


def main(argv):
  from nmjax import cli
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every file it writes at INFO and TFDS warns while probing for datasets: keep the
    # terminal for nmjax's own lines (--verbosity=0 brings the library logs back).
    logging.set_verbosity(logging.ERROR)
  from nmjax import jobs
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("runs", str(config.get("job", "job")))
  with cli.one_line_errors():
    jobs.run(config, workdir)


def parse_flags(argv):
  """absl's flag parsing, with each error (a config typo, a missing config file) as one line."""
  from nmjax import cli
  return cli.parse_flags(argv, default_config=_DEFAULT_CONFIG)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
