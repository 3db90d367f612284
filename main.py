r"""nmjax command line: validates a config into its job's plan once, then runs the plan.

  python main.py                     # the embedded study (configs/default.py) in runs/study
  python main.py --config configs/pretrain.py:dataset=fashion_mnist,noise=0.2 --workdir DIR
  python main.py --config configs/pretrain.py --config.num_train_steps=200 --workdir DIR
  python main.py --config configs/transfer.py --config.checkpoint=DIR --dry_run   # the plan

Errors in the config or the data, a config flag that does not parse, a full disk or a path that
cannot be written print one line naming the field (or file) and exit with code 2 (NMJAX_DEBUG=1
prints their traceback too); any other exception is a bug and keeps its traceback.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")
# No default here: config_flags would load it (and apply the --config.* overrides) while this
# module is imported, where a typo is a traceback; parse_flags passes the default instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, path[:args] (default: configs/default.py, the study). Fields"
    " are overridden with --config.FIELD=VALUE; lists are comma-separated.", lock_config=True)
flags.FLAGS["config"].default_as_str = None  # --help: the help text names the default.
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go"
                               " (default: runs/<job>).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved plan as JSON and exit 0,"
                             " creating and writing nothing.")


def main(argv):
  from nmjax import errors  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    errors.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)")
  if not flags.FLAGS["verbosity"].present:
    # orbax logs every file it writes at INFO and TFDS warns while probing for datasets: keep the
    # terminal for nmjax's own lines (--verbosity=0 brings the library logs back).
    logging.set_verbosity(logging.ERROR)
  from nmjax import jobs  # pylint: disable=g-import-not-at-top
  from nmjax.jobs import plans  # pylint: disable=g-import-not-at-top
  with errors.one_line_errors():
    job, plan = jobs.validate(_CONFIG.value)
    if _DRY_RUN.value:
      print(plans.to_json(plan, job.NAME), flush=True)
      return
    jobs.execute(job, plan, _WORKDIR.value or os.path.join("runs", job.NAME))


def parse_flags(argv):
  """absl's flag parsing, with each error (a config typo, a missing config file) as one line."""
  from nmjax.jobs import cli  # pylint: disable=g-import-not-at-top
  return cli.parse_flags(argv, default_config=_DEFAULT_CONFIG)


def _usage() -> str:
  """This docstring, then the configs and the jobs (what --help prints above the flags)."""
  from nmjax.jobs import cli  # pylint: disable=g-import-not-at-top
  return __doc__ + "\n" + cli.configs_help(os.path.join(_HERE, "configs"))


if __name__ == "__main__":
  if any(a in ("--help", "-help", "--helpfull", "-h", "--helpshort") for a in sys.argv[1:]):
    __doc__ = _usage()  # absl prints the main module's docstring with --help.
  app.run(main, flags_parser=parse_flags)
