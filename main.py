"""nmjax's command from a checkout: `python main.py [flags]` is `nmjax [flags]`.

The command lives in nmjax/jobs/command.py; `python main.py --help` lists its flags, the configs
and the jobs. From here the default config and the configs --help lists are this checkout's
configs/, whichever nmjax is installed.
"""

import os

from nmjax.jobs import command

if __name__ == "__main__":
  command.main(default_config=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"))
