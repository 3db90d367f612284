"""The one evaluation path (nmjax.evaluate): the method registry as plug-ins, one fit per train
split shared by its tasks, the probes' and NMTune's rows; and the house rules the rooms keep
(configs import no jax, no library module imports a job, no job imports another)."""

import ast
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from nmjax import encoder as encoder_lib
from nmjax import evaluate, tasks as tasks_lib
from nmjax.errors import ConfigError
from nmjax.jobs import transfer, tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import nmtune as nmtune_config  # pylint: disable=wrong-import-position
from configs import transfer as transfer_config  # pylint: disable=wrong-import-position


def _cache(workdir):
  """A frozen small ResNet at its seeded initialization (no pre-training run needed)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nmjax import models  # pylint: disable=g-import-not-at-top
  from nmjax.data import sources  # pylint: disable=g-import-not-at-top
  from nmjax.train.steps import normalize  # pylint: disable=g-import-not-at-top
  info = sources.get_source("digits").info
  model = models.get_model("resnet_small", num_classes=info.num_classes)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *info.image_shape)), train=False)

  def encode(variables, images):
    return model.apply(variables, normalize(images, info.mean, info.std, jnp.float32),
                       train=False)[1]

  pre = encoder_lib.pretraining({"job": "pretrain", "model": "resnet_small", "dataset": "digits",
                                 "dtype": "float32", "noise_ratio": 0.0,
                                 "noise_type": "symmetric"})
  enc = encoder_lib.Encoder(workdir=str(workdir), step=0, pretraining=pre, info=info,
                            variables=variables, encode=encode, feature_dim=64,
                            digest=encoder_lib.content_digest(pre, variables))
  return encoder_lib.FeatureCache(enc, str(workdir), batch_size=200, max_examples=300,
                                  data_dir=None, mesh=None)


def test_a_new_method_is_one_registry_entry(tmp_path, monkeypatch):
  calls = []

  def nearest_mean(train, tests, config, *, logit_subsets=None, log=None):
    """A plug-in: nearest class mean of the plain train features."""
    del log
    calls.append((train.num_examples, sorted(tests), dict(logit_subsets)))
    means = np.stack([train.features[train.labels == c].mean(0)
                      for c in range(config.num_classes)])
    return {name: {"accuracy": float(np.mean(np.argmin(
        ((t.features[:, None] - means[None]) ** 2).sum(-1), 1) == t.labels)), "seconds": 0.0}
            for name, t in tests.items()}

  monkeypatch.setitem(evaluate.METHODS, "nearest_mean", nearest_mean)
  monkeypatch.setattr(evaluate, "PROBE_METHODS", (*evaluate.PROBE_METHODS, "nearest_mean"))
  chosen = tasks_lib.resolve("digits,digits_to_mnist")  # One train split: one fit for both.
  probes = transfer.validate(transfer_config.get_config())
  request = evaluate.Request(
      chosen, ["nearest_mean", "ridge"],
      lambda m, c: (ml_collections.ConfigDict({"num_classes": c}) if m == "nearest_mean"
                    else transfer.method_config(probes, m, c)),
      evaluate.probe_row, prefix="[test]")
  result = evaluate.run(_cache(tmp_path), request)
  assert calls == [(300, ["digits", "digits_to_mnist"],
                    {"digits": None, "digits_to_mnist": None})]
  assert [(r["task"], r["method"]) for r in result.rows] == [
      ("digits", "nearest_mean"), ("digits", "ridge"), ("digits_to_mnist", "nearest_mean"),
      ("digits_to_mnist", "ridge")]
  for row in result.rows:
    assert 0.0 <= row["accuracy"] <= 1.0 and row["num_train"] == 300 and row["step"] == 0
  assert result.rows[0]["accuracy"] > 0.1  # Better than chance on 10 digit classes.
  assert set(result.spectra) == {"digits", "digits_to_mnist"}
  assert result.features_extracted == 3  # digits train, digits test, MNIST test.


def test_the_linear_probe_plugin_matches_the_probe_and_reports_its_protocol(tmp_path):
  from nmjax import probe  # pylint: disable=g-import-not-at-top
  cache = _cache(tmp_path)
  task = tasks_lib.resolve("digits")[0]
  train, (test, _) = cache.get(task.train), cache.test_set(task)
  config = nmtune_config.get_config("smoke")
  config.seed, config.checkpoint = 3, "unused"  # validate never opens it.
  lp_config = tuning.method_config(tuning.validate(config), "lp", num_classes=10)
  assert lp_config.seed == 3 and lp_config.num_epochs == 2 and lp_config.num_classes == 10
  result = evaluate.METHODS["lp"](train, {"t": test}, lp_config)["t"]
  direct = probe.linear_probe(train, test, lp_config)
  assert result["accuracy"] == direct["accuracy"]
  assert (result["method"], result["epochs"], result["lr"], result["svd_weight"]) == (
      "lp", 2, 1e-2, 0.0)
  # A transfer config's probes read config.probe (seed 0 there).
  assert transfer.method_config(transfer.validate(transfer_config.get_config()), "lp",
                                10).seed == 0


def test_probes_refuse_augmented_views_and_checks_name_the_field():
  from nmjax import nmtune  # pylint: disable=g-import-not-at-top
  views = nmtune.CachedViews(np.zeros((2, 8, 4), np.float32), np.arange(8) % 2)
  with pytest.raises(ConfigError, match="config.method='ridge' trains on plain features"):
    evaluate.METHODS["ridge"](views, {}, ml_collections.ConfigDict())
  with pytest.raises(ConfigError, match=r"config.methods entry 'nmtune' is unknown; allowed: lp,"
                                        r" ridge"):
    transfer.validate(transfer_config.get_config("methods=lp+nmtune"))
  with pytest.raises(ConfigError, match=r"config.methods entry 'ridge' is unknown"):
    tuning.validate(nmtune_config.get_config("methods=ridge"))
  with pytest.raises(ConfigError, match=r"config.method entry 'ridge' is unknown"):
    tuning.validate(nmtune_config.get_config("method=ridge"))  # The older name, still read.


def _imports(path):
  tree = ast.parse(open(path).read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def _modules(folder):
  for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
    for name in files:
      if name.endswith(".py"):
        yield os.path.join(dirpath, name)


def test_rooms_import_one_way():
  for path in _modules("configs"):
    for name in _imports(path):
      assert name.split(".")[0] in ("ml_collections", "nmjax", "__future__"), (path, name)
      if name.startswith("nmjax"):
        assert name.startswith("nmjax.config"), (path, name)
  jobs_dir = os.path.join(ROOT, "nmjax", "jobs")
  from nmjax import jobs as jobs_package  # pylint: disable=g-import-not-at-top
  jobs = {module.__name__ for module in jobs_package.JOBS.values()}
  for path in _modules("nmjax"):
    names = _imports(path)
    if not path.startswith(jobs_dir):
      assert not any(n.startswith("nmjax.jobs") for n in names), path
    elif not re.fullmatch(r"__init__|study(_\w+)?", os.path.basename(path)[:-3]):
      # The registry, and the study (a sweep of jobs) with its parts, aside: a job may use the
      # runner's shared parts (plans, workdir, tables, figures) and its own parts
      # (nmjax/jobs/<job>_<part>.py), never another job.
      own = f"nmjax.jobs.{os.path.basename(path)[:-3]}_"
      assert not {n for n in names if n in jobs and not n.startswith(own)}, (path, names)


def test_a_config_file_loads_without_jax():
  code = ("import sys; sys.path.insert(0, '.'); from configs import default, nmtune, transfer,"
          " pretrain; default.get_config(); nmtune.get_config(); transfer.get_config();"
          " pretrain.get_config(); assert 'jax' not in sys.modules, 'jax imported'")
  done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
