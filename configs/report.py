r"""Render finished studies into one report: results.jsonl, results.md, plots and tb/.

  .venv/bin/python main.py --config configs/report.py --config.workdirs=runs/study \
      --workdir runs/study_report
  .venv/bin/python main.py --config configs/report.py:workdirs=runs/seeds01+runs/seed2 \
      --workdir runs/merged
  .venv/bin/python main.py --config configs/report.py --config.workdirs=runs/claims \
      --config.seeds=0,1,2,3 --workdir runs/claims_seeds0-3

config.workdirs: study workdirs (comma-separated), each with its plan.json and finished stages;
the first one's plan names the tasks, methods and noise ratios; seeds found in the others are
added. config.seeds: the seeds to render (comma-separated; empty: every seed found), e.g. two
halves of one study rendered apart to see whether their verdicts agree. A noise ratio is shown
when every rendered seed has finished it.
"""

import ml_collections

from nmjax.config import parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg, workdirs="", seeds="")
  config = ml_collections.ConfigDict()
  config.job = "report"
  config.workdirs = args.workdirs.replace("+", ",")  # Study workdirs, comma-separated.
  config.seeds = args.seeds.replace("+", ",")  # Seeds to render, comma-separated; empty: all.
  return config
