"""Every documented command is checked: the ```bash / ```sh / ```console / ```python blocks of
README.md and docs/**/*.md.

Each command that runs main.py (or the `nmjax` console script) has its `--config=FILE[:args]`
loaded as main.py loads it (nmjax.jobs.cli.load_config; configs/default.py without --config), and
each of its arguments, `--config.FIELD=VALUE` overrides (nested paths too) and other flags must
exist; `python -m nmjax.X` must name a runnable module and `bash/python path` an existing file.
Python blocks must parse, and every nmjax module and name they import or use must exist.
Shell variables set by `X=...` or `for X in ...` are expanded; other variables and placeholders
(DIR, OUT, $CKPT, <path>) in values are not checked.

An HTML comment on the line right before a fence changes what happens to its block:
  <!-- docs-test: run -->          the block runs and must exit 0 within RUN_TIMEOUT_S seconds:
                                   shell with `bash -e` in a scratch dir (python and main.py
                                   point at this checkout, /tmp/... lands in the scratch dir),
                                   python with `python -c` in the repository root;
  <!-- docs-test: skip REASON -->  the block does not run here (a pod, a GPU, a bucket); its
                                   commands are still checked as above.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import itertools
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys

import pytest
# absl.app and absl.logging define the flags every absl program takes (--verbosity, --pdb...).
from absl import app as absl_app  # noqa: F401  pylint: disable=unused-import
from absl import flags as absl_flags
from absl import logging as absl_logging  # noqa: F401  pylint: disable=unused-import

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import nmjax.config as nmjax_config  # pylint: disable=wrong-import-position
from nmjax.jobs import cli  # pylint: disable=wrong-import-position

RUN_TIMEOUT_S = 120
DEFAULT_CONFIG = "configs/default.py"
SHELL_LANGS = {"bash", "sh", "shell", "zsh", "console", "shell-session"}
PYTHON_LANGS = {"python", "py", "python3", "pycon"}
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)\s*$")
# A marker is a line of its own (a mention of one in prose or inside a fence is not).
_MARKER = re.compile(r"^\s*<!--\s*docs-test\b:?\s*(?P<text>.*?)\s*-->\s*$")
_PROMPT = re.compile(r"^\s*(?:\([\w.-]+\)\s*)?\$ ?")
# A value the reader fills in: a shell variable, <path>, {name}, an upper-case word (DIR, OUT).
_PLACEHOLDER = re.compile(r"\$|<[^>]*>|\{\w+\}|\.\.\.|(?<![A-Za-z])[A-Z][A-Z0-9_]*(?![a-z])")
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_SEPARATORS = set("();|&")
# Words before the command itself: shell keywords and wrappers that run the next word.
_PREFIX_WORDS = {"do", "then", "else", "elif", "if", "while", "until", "!", "time", "exec",
                 "env", "nohup", "sudo", "command", "{"}
_HELP_FLAGS = {"help", "helpshort", "helpfull", "helpxml", "h", "?", "flagfile", "undefok"}


@dataclasses.dataclass
class Block:
  """One fenced block: `line` is the fence's line (1-based); `body` holds (line, text) pairs."""
  path: str
  index: int
  lang: str
  line: int
  body: list[tuple[int, str]]
  marker: str | None = None  # "run", "skip" or None
  reason: str = ""

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line}"


# ----------------------------------------------------------------------------- the blocks


def doc_files() -> list[pathlib.Path]:
  """README.md and every docs/**/*.md, in a stable order."""
  docs = sorted((ROOT / "docs").rglob("*.md")) if (ROOT / "docs").is_dir() else []
  return [p for p in [ROOT / "README.md", *docs] if p.is_file()]


def _language(info: str) -> str:
  first = info.split()[0] if info.split() else ""
  return first.strip("{}").lstrip(".").lower()


def _marker(line: str) -> tuple[str | None, str]:
  match = _MARKER.search(line)
  if not match:
    return None, ""
  kind, _, reason = match.group("text").partition(" ")
  return kind, reason.strip()


def extract_blocks(text: str, path: str) -> list[Block]:
  """The shell and python blocks of a markdown text, with the marker on the line before each."""
  lines, blocks, i = text.splitlines(), [], 0
  while i < len(lines):
    match = _FENCE.match(lines[i])
    if not match:
      i += 1
      continue
    indent, fence = len(match.group("indent")), match.group("fence")
    end = i + 1
    while end < len(lines) and not re.fullmatch(
        rf"[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*", lines[end]):
      end += 1
    lang = _language(match.group("info"))
    if lang in SHELL_LANGS | PYTHON_LANGS:
      body = [(n + 1, _unindent(lines[n], indent)) for n in range(i + 1, end)]
      kind, reason = _marker(lines[i - 1]) if i else (None, "")
      blocks.append(Block(path, len(blocks), lang, i + 1, body, kind, reason))
    i = end + 1
  return blocks


def _unindent(line: str, indent: int) -> str:
  return line[min(indent, len(line) - len(line.lstrip())):]


def _fenced(lines: list[str]) -> set[int]:
  """The indices of the lines of fenced blocks, fences included."""
  inside, fence = set(), None
  for n, line in enumerate(lines):
    match = _FENCE.match(line)
    if fence is None and match:
      fence = match.group("fence")
    elif fence is not None and re.fullmatch(
        rf"[ \t]*{re.escape(fence[0])}{{{len(fence)},}}[ \t]*", line):
      fence = None
    elif fence is None:
      continue
    inside.add(n)
  return inside


def marker_problems(text: str, path: str) -> list[str]:
  """Markers that say nothing known, lack a reason, or are not right before a checked fence."""
  lines, problems = text.splitlines(), []
  fenced = _fenced(lines)
  for n, line in enumerate(lines):
    kind, reason = _marker(line)
    if kind is None or n in fenced:
      continue
    where = f"{path}:{n + 1}"
    fence = _FENCE.match(lines[n + 1]) if n + 1 < len(lines) else None
    lang = _language(fence.group("info")) if fence else ""
    if kind not in ("run", "skip"):
      problems.append(f"{where}: a docs-test marker is `<!-- docs-test: run -->` or"
                      f" `<!-- docs-test: skip REASON -->`, not {line.strip()!r}")
    elif kind == "skip" and not reason:
      problems.append(f"{where}: `docs-test: skip` needs a reason (a pod, a GPU, a bucket...)")
    elif lang not in SHELL_LANGS | PYTHON_LANGS:
      problems.append(f"{where}: a docs-test marker must be on the line right before a fenced"
                      f" {'/'.join(sorted(SHELL_LANGS | PYTHON_LANGS))} block")
  return problems


# ------------------------------------------------------------------------ shell commands


def _tokens(text: str) -> list[str]:
  lexer = shlex.shlex(_without_comment(text), posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  lexer.commenters = ""
  return list(lexer)


def _without_comment(text: str) -> str:
  """text up to a `#` that starts a word outside quotes (shlex would also cut `a#b`)."""
  quote, escaped = None, False
  for i, char in enumerate(text):
    if escaped:
      escaped = False
    elif char == "\\" and quote != "'":
      escaped = True
    elif quote:
      quote = None if char == quote else quote
    elif char in "'\"":
      quote = char
    elif char == "#" and (i == 0 or text[i - 1].isspace() or text[i - 1] in ";&|()"):
      return text[:i]
  return text


def _shell_lines(block: Block) -> list[tuple[int, str]]:
  """The block's commands as (line, text): console prompts only, `\\` continuations joined."""
  body = block.body
  if block.lang in ("console", "shell-session"):
    prompted = [(n, t) for n, t in body if _PROMPT.match(t)]
    if prompted:
      body = _with_continuations(body, {n for n, _ in prompted})
  logical, pending, start = [], "", 0
  for n, text in body:
    if not pending:
      start = n
    pending += text
    if re.search(r"(?<!\\)(?:\\\\)*\\$", pending):
      pending = pending[:-1] + " "
      continue
    logical.append((start, pending))
    pending = ""
  if pending:
    logical.append((start, pending))
  return logical


def _with_continuations(body, prompted: set[int]) -> list[tuple[int, str]]:
  kept, going = [], False
  for n, text in body:
    if n in prompted:
      kept.append((n, _PROMPT.sub("", text, count=1)))
      going = text.rstrip().endswith("\\")
    elif going:
      kept.append((n, text))
      going = text.rstrip().endswith("\\")
  return kept


def shell_commands(block: Block) -> list[tuple[int, list[str]]]:
  """(line, tokens) of every simple command of a shell block, including those inside quoted
  strings (sbatch --wrap '...') and $( ... ); a quote left open joins the next lines; the body of
  a here-document is skipped."""
  lines, commands, i = _shell_lines(block), [], 0
  while i < len(lines):
    start, text = lines[i]
    tokens = None
    while tokens is None:
      try:
        tokens = _tokens(text)
      except ValueError:  # A quote that closes on a later line.
        i += 1
        if i >= len(lines):
          tokens = []
        else:
          text += "\n" + lines[i][1]
    i = _skip_heredoc(tokens, lines, i + 1)
    commands += [(start, c) for c in _split_commands(tokens)]
  return commands


def _skip_heredoc(tokens: list[str], lines, i: int) -> int:
  for k, token in enumerate(tokens[:-1]):
    if token == "<<":
      word = tokens[k + 1].lstrip("-")
      while i < len(lines) and lines[i][1].strip() != word:
        i += 1
      return i + 1
  return i


def _split_commands(tokens: list[str]) -> list[list[str]]:
  commands, current, skip_next = [], [], False
  for token in tokens:
    if skip_next:
      skip_next = False
    elif token and set(token) <= _SEPARATORS | set("<>"):
      skip_next = bool(set(token) & set("<>")) and not token.endswith("&")
      if not skip_next:
        commands.append(current)
        current = []
    elif re.search(r"\s", token) and re.search(r"main\.py|nmjax|python", token):
      try:
        commands += _split_commands(_tokens(token))
      except ValueError:
        pass  # Not a command after all (a quote of its own left open).
      current.append(token)
    else:
      current.append(token)
  commands.append(current)
  return [c for c in commands if c]


def _variables(commands: list[tuple[int, list[str]]]) -> dict[str, list[str]]:
  """The literal values of `X=value` and `for X in a b c` in a block (the others stay unknown)."""
  values: dict[str, list[str]] = {}
  for _, tokens in commands:
    if len(tokens) > 2 and tokens[0] == "for" and tokens[2] == "in":
      words = list(itertools.takewhile(lambda t: t != "do", tokens[3:]))
      if words and not any("$" in w or "`" in w for w in words):
        values[tokens[1]] = words
    elif all(re.match(r"^[A-Za-z_]\w*=", t) for t in tokens):
      for token in tokens:
        name, _, value = token.partition("=")
        if "$" not in value and "`" not in value:
          values[name] = [value]
  return values


def _expansions(tokens: list[str], values: dict[str, list[str]]) -> list[list[str]]:
  """The command once for each combination of the known variables it uses (at most 64)."""
  used = sorted({a or b for t in tokens for a, b in _VARIABLE.findall(t)} & set(values))
  combos = list(itertools.islice(itertools.product(*(values[v] for v in used)), 64))
  expanded = []
  for combo in combos:
    known = dict(zip(used, combo))
    expanded.append([_VARIABLE.sub(lambda m, k=known: k.get(m.group(1) or m.group(2),
                                                             m.group(0)), t) for t in tokens])
  return expanded


# --------------------------------------------------------------------------- the checks


def _strip_prefix(tokens: list[str]) -> list[str]:
  i = 0
  while i < len(tokens) and (tokens[i] in _PREFIX_WORDS or re.match(r"^[A-Za-z_]\w*=", tokens[i])
                             or tokens[i].endswith("$")):
    i += 1
  return tokens[i:]


def _is_python(token: str) -> bool:
  return re.fullmatch(r"python[0-9.]*", os.path.basename(token)) is not None


def cli_arguments(tokens: list[str]) -> list[str] | None:
  """The arguments after main.py (run by a python) or the `nmjax` console script, else None."""
  tokens = _strip_prefix(tokens)
  if tokens and os.path.basename(tokens[0]) == "nmjax":
    return tokens[1:]
  for k, token in enumerate(tokens):
    if os.path.basename(token) == "main.py" and (k == 0 or any(map(_is_python, tokens[:k]))):
      return tokens[k + 1:]
    if token == "-m" and k + 1 < len(tokens) and tokens[k + 1] == "nmjax":
      return tokens[k + 2:]
  return None


def _placeholder(text: str | None) -> bool:
  return bool(text) and _PLACEHOLDER.search(text) is not None


@functools.lru_cache(maxsize=None)
def _main_flags() -> dict[str, bool]:
  """{flag name: is boolean} of main.py's own flags (read from its code and the console
  script's) and absl's."""
  found = {name: absl_flags.FLAGS[name].boolean for name in absl_flags.FLAGS}
  for path in (ROOT / "main.py", ROOT / "nmjax" / "jobs" / "command.py"):
    if not path.is_file():
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr.startswith("DEFINE_") and node.args
          and isinstance(node.args[0], ast.Constant)):
        found[node.args[0].value] = node.func.attr in ("DEFINE_bool", "DEFINE_boolean")
  found.update({name: True for name in _HELP_FLAGS})
  return found


def _flag_problems(args: list[str]) -> list[str]:
  """main.py's flags other than --config and --config.*: each must be defined."""
  known, problems, i = _main_flags(), [], 0
  while i < len(args):
    arg = args[i]
    i += 1
    if arg == "--":
      break
    match = re.match(r"^--?([A-Za-z_?][\w-]*)(=.*)?$", arg)
    if not match or re.match(r"^--?(no)?config(\.|=|$)", arg):
      i += arg in ("--config", "-config")
      continue
    name, has_value = match.group(1), match.group(2) is not None
    negated = name.startswith("no") and known.get(name[2:]) is True
    if name not in known and not negated:
      close = difflib.get_close_matches(name, list(known), n=2)
      hint = f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""
      problems.append(f"{arg}: main.py has no flag --{name}{hint}")
    elif not has_value and not negated and known.get(name) is False:
      i += 1  # --workdir DIR
  return problems


@functools.lru_cache(maxsize=None)
def _load(config_arg: str):
  """(config, the defaults of its `path:args`, error) of main.py's load of --config=config_arg,
  with the config file's parse_arg watched so that an argument can be checked by name alone."""
  seen = {}
  parse_arg = nmjax_config.parse_arg

  def watched(arg, **defaults):
    seen.update(defaults)
    return parse_arg(arg, **defaults)

  nmjax_config.parse_arg = watched
  try:
    return cli.load_config(config_arg), seen or None, None
  except Exception as e:  # pylint: disable=broad-except
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return None, seen or None, f"{type(e).__name__}: {lines[0] if lines else ''}"
  finally:
    nmjax_config.parse_arg = parse_arg


def _load_config(config_arg: str) -> tuple[object, list[str]]:
  """The config of --config=config_arg (None if it cannot be checked) and what is wrong with it.
  Arguments with a placeholder value are checked by name: the config loads without them."""
  path, colon, arg = config_arg.partition(":")
  if _placeholder(path):
    return None, []
  full = path if os.path.isabs(path) else str(ROOT / path)
  missing = cli.missing_config_file(full)
  if missing:
    return None, [missing.replace(str(ROOT) + os.sep, "")]
  items = [item.strip() for item in arg.split(",") if item.strip()]
  literal = [item for item in items if not _placeholder(item.partition("=")[2])]
  config, defaults, error = _load(full + colon + ",".join(literal))
  if error:
    return None, [f"--config={config_arg}: {error}"]
  unknown = [] if defaults is None else [
      item.partition("=")[0] for item in items
      if item not in literal and item.partition("=")[0] not in defaults]
  return config, [f"--config={config_arg}: config argument {name!r} is unknown; known:"
                  f" {', '.join(sorted(defaults))}" for name in unknown]


def check_cli(args: list[str]) -> list[str]:
  """What main.py would reject in `args` (its --config, config arguments and fields, flags)."""
  problems = _flag_problems(args)
  config_arg = cli.config_argument(args) or DEFAULT_CONFIG
  config, config_problems = _load_config(config_arg)
  problems += config_problems
  if config is None:
    return problems
  for path, value in cli.overrides(args):
    if _placeholder(path):
      continue
    problem = cli.check_override(config, path, value)
    if problem and _placeholder(value):
      problem = cli.check_override(config, path, None)  # --config.steps=N: the name only.
    if problem:
      problems.append(problem)
  return problems


def _module_file(module: str) -> pathlib.Path | None:
  base = ROOT.joinpath(*module.split("."))
  for candidate in (base.with_suffix(".py"), base / "__init__.py"):
    if candidate.is_file():
      return candidate
  return None


def check_module(module: str) -> list[str]:
  """`python -m nmjax.X`: the module exists and runs as a script."""
  if module.split(".")[0] != "nmjax" or _placeholder(module):
    return []
  found = _module_file(module)
  if found is None:
    return [f"-m {module}: no module {module} in this repository"]
  runnable = (found.name == "__main__.py" or (found.parent / "__main__.py").is_file()
              if found.name == "__init__.py" else "__main__" in found.read_text())
  return [] if runnable else [f"-m {module}: {found.relative_to(ROOT)} does not run as a script"]


def check_interpreter(tokens: list[str]) -> list[str]:
  """`python -m MODULE` and `python|bash|sh FILE` (a file of this repository) exist."""
  tokens = _strip_prefix(tokens)
  for k, token in enumerate(tokens):
    name = os.path.basename(token)
    if not (_is_python(token) or name in ("bash", "sh")):
      continue
    rest = [t for t in tokens[k + 1:] if t not in ("-e", "-u", "-x", "-B", "-O")]
    if not rest or rest[0] == "-c":
      return []
    if rest[0] == "-m" and len(rest) > 1:
      return check_module(rest[1])
    target = rest[0]
    if (re.search(r"\.(py|sh)$", target) and not os.path.isabs(target) and not _placeholder(target)
        and not target.startswith(("runs/", "~")) and not (ROOT / target).is_file()):
      return [f"{target}: no such file in this repository"]
    return []
  return []


def check_shell_block(block: Block) -> list[str]:
  """Every problem of a shell block's commands, as `file:line: problem`."""
  commands = shell_commands(block)
  values = _variables(commands)
  problems = []
  for line, tokens in commands:
    for expanded in _expansions(tokens, values):
      args = cli_arguments(expanded)
      found = check_cli(args) if args is not None else check_interpreter(expanded)
      for problem in found:  # Once, where a loop or a quoted copy names it again.
        entry = f"{block.path}:{line}: {problem}"
        if entry not in problems:
          problems.append(entry)
  return problems


# ---------------------------------------------------------------------------- python blocks


def python_source(block: Block) -> str:
  """A python block's code (the `>>> ` / `... ` lines of an interactive session)."""
  lines = [text for _, text in block.body]
  if any(t.lstrip().startswith(">>>") for t in lines):
    lines = [re.sub(r"^\s*(>>>|\.\.\.) ?", "", t) if re.match(r"^\s*(>>>|\.\.\.)( |$)", t)
             else "" for t in lines]
  return "\n".join(lines)


def _top_level_names(path: pathlib.Path) -> set[str] | None:
  """The names a module defines at its top level; None when it can define any (star import,
  module __getattr__)."""
  names: set[str] = set()
  statements = list(ast.parse(path.read_text()).body)
  while statements:
    node = statements.pop()
    if isinstance(node, (ast.If, ast.Try, ast.With)):
      statements += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
      statements += [s for h in getattr(node, "handlers", []) for s in h.body]
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      if node.name == "__getattr__":
        return None
      names.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      if any(a.name == "*" for a in node.names):
        return None
      names |= {a.asname or a.name.split(".")[0] for a in node.names}
    elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
  return names


def _attribute_problem(module: str, name: str) -> str | None:
  """None when nmjax module `module` has `name` (a definition or a submodule)."""
  if _module_file(f"{module}.{name}") is not None:
    return None
  found = _module_file(module)
  names = _top_level_names(found) if found else set()
  if names is None or name in names:
    return None
  close = difflib.get_close_matches(name, sorted(n for n in names if not n.startswith("_")), n=3)
  hint = f"; did you mean {' or '.join(close)}?" if close else ""
  return f"{module} has no {name!r}{hint}"


def check_python_block(block: Block) -> list[str]:
  """A python block parses, and the nmjax modules and names it imports or uses exist."""
  try:
    tree = ast.parse(python_source(block))
  except SyntaxError as e:
    return [f"{block.path}:{block.line + (e.lineno or 1)}: the python does not parse: {e.msg}"]
  modules, problems = {}, []

  def report(node, problem):
    if problem:
      problems.append(f"{block.path}:{block.line + node.lineno}: {problem}")

  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "nmjax":
          report(node, None if _module_file(alias.name) else f"no module {alias.name}")
          modules[alias.asname or "nmjax"] = alias.name if alias.asname else "nmjax"
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level and (
        node.module.split(".")[0] == "nmjax"):
      if _module_file(node.module) is None:
        report(node, f"no module {node.module}")
        continue
      for alias in node.names:
        report(node, _attribute_problem(node.module, alias.name))
        if _module_file(f"{node.module}.{alias.name}"):
          modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
  for node in ast.walk(tree):
    chain = _module_chain(node, modules)
    if chain:
      report(node, _attribute_problem(*chain))
  return problems


def _module_chain(node, modules: dict[str, str]) -> tuple[str, str] | None:
  """(module, name) when node is `alias.name` (or `alias.sub.name`) of an imported nmjax module,
  the module part resolved through submodules."""
  if not isinstance(node, ast.Attribute):
    return None
  parts, base = [node.attr], node.value
  while isinstance(base, ast.Attribute):
    parts.insert(0, base.attr)
    base = base.value
  if not isinstance(base, ast.Name) or base.id not in modules:
    return None
  module = modules[base.id]
  for part in parts[:-1]:
    if _module_file(f"{module}.{part}") is None:
      return None  # An attribute of a name, checked where that name is (its own node).
    module = f"{module}.{part}"
  return module, parts[-1]


# ------------------------------------------------------------------------------ entry points


def check_block(block: Block) -> list[str]:
  return check_shell_block(block) if block.lang in SHELL_LANGS else check_python_block(block)


def check_markdown(text: str, path: str) -> list[str]:
  """Every problem of a markdown text's blocks and markers (what the tests below assert)."""
  problems = marker_problems(text, path)
  for block in extract_blocks(text, path):
    problems += check_block(block)
  return problems


def _all_blocks() -> list[Block]:
  return [b for p in doc_files() for b in extract_blocks(p.read_text(), str(p.relative_to(ROOT)))]


BLOCKS = _all_blocks()
RUN_BLOCKS = [b for b in BLOCKS if b.marker == "run"]


def _block_id(block: Block) -> str:
  return f"{block.path}#{block.index}:L{block.line}"


# -------------------------------------------------------------------------------- running


def _scratch(tmp_path: pathlib.Path) -> pathlib.Path:
  """A scratch dir that sees the checkout's files (configs/, scripts/, .venv...), not its runs."""
  scratch = tmp_path / "work"
  (scratch / "tmp").mkdir(parents=True)
  for entry in ROOT.iterdir():
    if entry.name not in ("runs", ".git", "tmp") and (
        not entry.name.startswith(".") or entry.name == ".venv"):
      (scratch / entry.name).symlink_to(entry)
  return scratch


def _cli_command() -> str:
  script = pathlib.Path(sys.executable).parent / "nmjax"
  if script.is_file():
    return shlex.quote(str(script))
  return f"{shlex.quote(sys.executable)} {shlex.quote(str(ROOT / 'main.py'))}"


def rewrite_shell(script: str, scratch: pathlib.Path) -> str:
  """The block as it runs here: python, main.py and `nmjax` point at this checkout, /tmp/...
  is under the scratch dir (runs/... already is: the block runs there)."""
  # /tmp first: the checkout and its interpreter put in below may live under /tmp themselves.
  script = re.sub(r"(?<![\w.~/-])/tmp(?=/|\s|$)", str(scratch / "tmp"), script, flags=re.M)
  python = shlex.quote(sys.executable)
  script = re.sub(r"(?<![\w./=-])(?:\./)?\.venv/bin/python[0-9.]*(?![\w.-])", python, script)
  script = re.sub(r"(?<![\w./=-])python[0-9.]*(?![\w./-])", python, script)
  script = re.sub(r"(?<![\w./=-])(?:\./)?main\.py(?![\w.-])", shlex.quote(str(ROOT / "main.py")),
                  script)
  script = re.sub(r"(^\s*|[;&|(]\s*|\b(?:do|then|time)\s+)(?:\./)?(?:\.venv/bin/)?nmjax(?=\s|$)",
                  lambda m: m.group(1) + _cli_command(), script, flags=re.M)
  return script


def run_block(block: Block, tmp_path: pathlib.Path, timeout: float = RUN_TIMEOUT_S) -> str | None:
  """Runs a block; None when it exits 0 in time, else what went wrong."""
  env = dict(os.environ)
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  if block.lang in PYTHON_LANGS:
    code, cwd = python_source(block), ROOT
    argv = [sys.executable, "-c", code]
  else:
    cwd = _scratch(tmp_path)
    code = rewrite_shell("\n".join(t for _, t in _run_lines(block)), cwd)
    (cwd / "docs_block.sh").write_text(code + "\n")
    argv = ["bash", "-e", "docs_block.sh"]
  process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    output, _ = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate()
    return _failure(block, f"did not finish in {timeout:.0f} s", code, output)
  return None if process.returncode == 0 else _failure(
      block, f"exited with code {process.returncode}", code, output)


def _run_lines(block: Block) -> list[tuple[int, str]]:
  if block.lang in ("console", "shell-session") and any(_PROMPT.match(t) for _, t in block.body):
    return _with_continuations(block.body, {n for n, t in block.body if _PROMPT.match(t)})
  return block.body


def _failure(block: Block, what: str, code: str, output: str) -> str:
  tail = "\n".join(output.strip().splitlines()[-30:])
  return f"{block.where}: the {block.lang} block {what}.\n--- as run:\n{code}\n--- output:\n{tail}"


# ---------------------------------------------------------------------------------- tests


def test_the_docs_have_blocks_to_check():
  assert (ROOT / "README.md").is_file()
  assert BLOCKS, "no ```bash / ```python block in README.md or docs/"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_test_markers_are_well_formed(path):
  problems = marker_problems(path.read_text(), str(path.relative_to(ROOT)))
  if problems:
    pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
def test_documented_commands_exist(block):
  problems = check_block(block)
  if problems:
    pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=_block_id)
def test_run_blocks_exit_0(block, tmp_path):
  failure = run_block(block, tmp_path)
  if failure:
    pytest.fail(failure, pytrace=False)


RENAMED = {
    "a renamed field": ("--config.num_train_stepz=3",
                        "--config.num_train_stepz: config has no field 'num_train_stepz'; did you"
                        " mean config.num_train_steps"),
    "a renamed config argument": ("--config=configs/pretrain.py:noize=0.2",
                                  "config argument 'noize' is unknown"),
    "a renamed config argument with a placeholder value": (
        "--config=configs/pretrain.py:noize=$N", "config argument 'noize' is unknown"),
    "a renamed config file": ("--config=configs/pretrian.py", "configs/pretrian.py does not"
                              " exist; did you mean configs/pretrain.py"),
    "a renamed nested field": ("--config configs/default.py --config.nmtune.epochz=2",
                               "config.nmtune has no field 'epochz'"),
    "a value of the wrong type": ("--config.num_train_steps=three",
                                  "config.num_train_steps is an integer"),
    "a renamed flag": ("--work_dir DIR", "main.py has no flag --work_dir; did you mean"
                       " --workdir"),
}


@pytest.mark.parametrize("flag,expected", RENAMED.values(), ids=RENAMED.keys())
def test_a_renamed_flag_is_reported(flag, expected):
  """The same check, on a snippet that names what does not exist, reports it with its line."""
  config = "" if "--config=" in flag or "--config " in flag else "--config configs/pretrain.py "
  text = f"Text\n\n```bash\n.venv/bin/python main.py {config}{flag} \\\n  --workdir DIR\n```\n"
  problems = check_markdown(text, "snippet.md")
  assert len(problems) == 1 and problems[0].startswith("snippet.md:4: "), problems
  assert expected in problems[0], problems[0]
  fixed = text.replace("stepz", "steps").replace("noize", "noise").replace("pretrian", "pretrain")
  fixed = fixed.replace("epochz", "epochs").replace("three", "3").replace("work_dir", "workdir")
  assert check_markdown(fixed, "snippet.md") == []


SNIPPETS = {
    "a loop over field names": (
        "```sh\nfor f in num_train_steps num_train_stepz; do\n"
        "  nmjax --config=configs/pretrain.py:smoke --config.$f=3\ndone\n```",
        ["snippet.md:3: --config.num_train_stepz: config has no field 'num_train_stepz'"]),
    "a command in sbatch --wrap": (
        "<!-- docs-test: skip a SLURM cluster -->\n```bash\n"
        "sbatch --wrap 'python main.py --config.stagez=$SLURM_ARRAY_TASK_ID' # one task\n```",
        ["snippet.md:3: --config.stagez: config has no field 'stagez'; did you mean"
         " config.stage?"]),
    "a console prompt": (
        "```console\n$ python main.py \\\n    --config.seedz=0,1\nmain.py --config.x=out\n```",
        ["snippet.md:2: --config.seedz: config has no field 'seedz'; did you mean config.seeds?"]),
    "a module": ("```bash\npython -m nmjax.data.image_txt convert --output DIR\n```",
                 ["snippet.md:2: -m nmjax.data.image_txt: no module nmjax.data.image_txt in this"
                  " repository"]),
    "a script": ("```bash\nbash scripts/bootstrapp.sh\n```",
                 ["snippet.md:2: scripts/bootstrapp.sh: no such file in this repository"]),
    "a python name": ("```python\nfrom nmjax import nmtune\nnmtune.fitt(train, test)\n```",
                      ["snippet.md:3: nmjax.nmtune has no 'fitt'; did you mean fit"]),
    "a python import": ("```python\nfrom nmjax.probe import linear_prob\n```",
                        ["snippet.md:2: nmjax.probe has no 'linear_prob'"]),
    "a marker not before a fence": ("<!-- docs-test: run -->\n\n```bash\ntrue\n```",
                                    ["snippet.md:1: a docs-test marker must be"]),
    "a skip without a reason": ("<!-- docs-test: skip -->\n```bash\ntrue\n```",
                                ["snippet.md:1: `docs-test: skip` needs a reason"]),
}


@pytest.mark.parametrize("text,expected", SNIPPETS.values(), ids=SNIPPETS.keys())
def test_other_mistakes_are_reported(text, expected):
  problems = check_markdown(text + "\n", "snippet.md")
  assert len(problems) == len(expected), problems
  for problem, start in zip(problems, expected):
    assert problem.startswith(start), problems


def test_a_failing_run_block_is_reported(tmp_path):
  text = ("<!-- docs-test: run -->\n```bash\npython -c 'import sys; print(sys.executable)'\n"
          "echo done > /tmp/out.txt && test -f tmp/out.txt\nfalse\necho not reached\n```\n")
  block, = extract_blocks(text, "snippet.md")
  failure = run_block(block, tmp_path)
  assert failure.startswith("snippet.md:2: the bash block exited with code 1"), failure
  assert sys.executable in failure and "not reached" not in failure.split("--- output:")[1]
  assert (tmp_path / "work" / "tmp" / "out.txt").is_file()
  assert run_block(dataclasses.replace(block, body=block.body[:2]), tmp_path / "again") is None


def _generated_blocks(text):
  """{source: lines} of the blocks a page marks `<!-- generated: SOURCE -->`, each up to the
  first blank line after its first table."""
  blocks = {}
  lines = text.splitlines()
  for i, line in enumerate(lines):
    match = re.fullmatch(r"<!-- generated: (\S+) -->", line.strip())
    if not match:
      continue
    body, seen_table = [], False
    for following in lines[i + 1:]:
      if not following.strip() and seen_table:
        break
      seen_table |= following.startswith("|")
      body.append(following)
    blocks.setdefault(match.group(1), []).append([l for l in body if l.strip()])
  return blocks


def test_claims_tables_are_pasted_whole_from_the_generated_results():
  """The README's and the study page's claims tables are the lines of a generated results.md
  (kept under docs/results/), not written by hand."""
  found = 0
  for page in ("README.md", "docs/study.md"):
    with open(os.path.join(ROOT, page)) as f:
      blocks = _generated_blocks(f.read())
    for source, bodies in blocks.items():
      with open(os.path.join(ROOT, source)) as f:
        generated = [line for line in f.read().splitlines() if line.strip()]
      for body in bodies:
        # Each paragraph of the block (a run line, a title, a table) is lines of the file, whole.
        paragraphs = [[body[0]]]
        for line in body[1:]:
          if line.startswith("|") and paragraphs[-1][-1].startswith("|"):
            paragraphs[-1].append(line)
          else:
            paragraphs.append([line])
        for lines in paragraphs:
          start = generated.index(lines[0])
          assert generated[start:start + len(lines)] == lines, (page, source, lines[0])
        assert any(len(lines) > 2 for lines in paragraphs), (page, source, "no table")
        found += 1
  assert found >= 3, "README.md and docs/study.md paste the generated claims tables"
