r"""The nmjax command line: validates a config into its job's plan once, then runs the plan.

  nmjax                      # the embedded study (configs/default.py) in runs/study
  nmjax --config configs/pretrain.py:dataset=fashion_mnist,noise=0.2 --workdir DIR
  nmjax --config configs/pretrain.py --config.num_train_steps=200 --workdir DIR
  nmjax --config configs/transfer.py --config.checkpoint=DIR --dry_run   # the plan

In a checkout, `python main.py ...` is the same command. `--config=configs/NAME.py` is that file
of the current directory when it exists there, else the copy installed with nmjax.

Errors in the config or the data, a config flag that does not parse, a full disk or a path that
cannot be written print one line naming the field (or file) and exit with code 2 (NMJAX_DEBUG=1
prints their traceback too); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

# No default here: config_flags would load it (and apply the --config.* overrides) while this
# module is imported, where a typo is a traceback; main() passes the default to the parser instead.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, path[:args] (default: configs/default.py, the study). Fields"
    " are overridden with --config.FIELD=VALUE; lists are comma-separated.", lock_config=True)
flags.FLAGS["config"].default_as_str = None  # --help: the help text names the default.
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results go"
                               " (default: runs/<job>).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved plan as JSON and exit 0,"
                             " creating and writing nothing.")

_FLAG_NAMES = ("config", "workdir", "dry_run")
_SHORT_HELP = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
_FULL_HELP = ("--helpfull", "-helpfull")
_CONFIG_FLAG = ("--config", "-config")


def installed_configs() -> str:
  """The folder of the configs that come with nmjax: `nmjax/configs` of an installed package
  (configs/ of the checkout for an editable install), else configs/ beside the nmjax package
  (a checkout on sys.path that was never installed)."""
  try:
    spec = importlib.util.find_spec("nmjax.configs")
  except (ImportError, ValueError):
    spec = None
  for folder in (spec.submodule_search_locations or ()) if spec else ():
    if os.path.isfile(os.path.join(folder, "default.py")):
      return folder
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(package), "configs")


def resolve_config(config_arg: str, folder: str) -> str:
  """`configs/NAME.py[:args]` as given when that file exists (relative to the current directory),
  else NAME.py of `folder` (the installed configs). Any other path is returned as given.

  With no configs/ folder in the current directory a missing NAME.py also points into `folder`,
  so the error lists the config files that do exist.
  """
  path, sep, args = config_arg.partition(":")
  if not path or os.path.isabs(path) or os.path.exists(path):
    return config_arg
  parts = os.path.normpath(path).split(os.sep)
  if len(parts) != 2 or parts[0] != "configs":
    return config_arg
  installed = os.path.join(folder, parts[1])
  if os.path.exists(installed) or not os.path.isdir("configs"):
    return installed + sep + args
  return config_arg


def _resolve_argv(argv: Sequence[str], folder: str) -> list[str]:
  """argv with the value of --config (either form) passed through resolve_config."""
  argv = list(argv)
  for i, arg in enumerate(argv):
    if i == 0:
      continue
    if arg in _CONFIG_FLAG and i + 1 < len(argv):
      argv[i + 1] = resolve_config(argv[i + 1], folder)
    for prefix in ("--config=", "-config="):
      if arg.startswith(prefix):
        argv[i] = prefix + resolve_config(arg[len(prefix):], folder)
  return argv


def usage(folder: str) -> str:
  """What --help prints above the flags: this module's docstring, the configs and the jobs."""
  from nmjax.jobs import cli  # pylint: disable=g-import-not-at-top
  return __doc__ + "\n" + cli.configs_help(folder)


def _print_help(folder: str, full: bool) -> None:
  """--help (the command's flags) or --helpfull (every flag), on stdout."""
  name = os.path.basename(sys.argv[0]) or "nmjax"
  for flag_name in _FLAG_NAMES:
    flags.FLAGS.register_key_flag_for_module(name, flags.FLAGS[flag_name])
  text = flags.FLAGS.get_help() if full else flags.FLAGS.module_help(name)
  text = usage(folder) + "\nflags:\n" + text + "\n"
  if not full:
    text += "\nTry --helpfull to get a list of all flags.\n"
  try:
    sys.stdout.write(text)
    sys.stdout.flush()
  except BrokenPipeError:  # `nmjax --help | head`: the reader left; no traceback.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _run(argv: Sequence[str]) -> None:
  """absl's main: the parsed flags -> the job's plan -> printed (--dry_run) or run."""
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


def main(argv: Sequence[str] | None = None, *, default_config: str | None = None) -> None:
  """Runs the command line `argv` (program name first; default sys.argv) and exits.

  Args:
    argv: the program name, then the flags: --config=path[:args], --config.FIELD=VALUE,
      --workdir, --dry_run, --help.
    default_config: the config run without --config. Its folder is the one --help lists and the
      one a relative `configs/NAME.py` missing from the current directory is read from. Default:
      default.py of the configs installed with nmjax (`installed_configs()`).

  Raises:
    SystemExit: always; 0 after a run, a plan (--dry_run) or --help, 2 with one line on stderr
      for an error in the config, the data or the environment.

  Example:
    main(["nmjax", "--config=configs/pretrain.py:smoke", "--dry_run"])
  """
  default_config = default_config or os.path.join(installed_configs(), "default.py")
  folder = os.path.dirname(default_config)
  argv = _resolve_argv(sys.argv if argv is None else argv, folder)
  sys.argv = argv  # config_flags finds the --config.FIELD overrides in sys.argv.
  full = any(a in _FULL_HELP for a in argv[1:])
  if full or any(a in _SHORT_HELP for a in argv[1:]):
    _print_help(folder, full)
    sys.exit(0)
  from nmjax.jobs import cli  # pylint: disable=g-import-not-at-top
  app.run(_run, argv=argv,
          flags_parser=functools.partial(cli.parse_flags, default_config=default_config))
