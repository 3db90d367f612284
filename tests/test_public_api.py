"""The public API (docs/api.md): every name imports from its room and is in that room's
__all__; a star import brings no private name; internals stay out of __all__."""

import importlib

import pytest

# The public API, room by room.
PUBLIC = {
    "nmjax.noise": ("symmetric_noise", "pairflip_noise", "shuffle_captions"),
    "nmjax.spectral": ("singular_values", "sve", "lsvr", "spectrum", "metrics"),
    "nmjax.nmtune": ("consistency_loss", "covariance_loss", "dominant_singular_value_loss",
                     "NMTuneHead", "fit", "fit_multi", "fit_grid"),
    "nmjax.probe": ("linear_probe", "ridge_probe"),
    "nmjax.features": ("extract",),
    "nmjax.clip": ("tokenize", "contrastive_loss"),
    "nmjax.convert": ("load",),
    "nmjax.models": ("get_model",),
    "nmjax.heads": ("Head", "load", "export"),
    "nmjax.jobs": ("JOBS",),
}
# Rooms with no public names of their own: users import their submodules.
EMPTY = ("nmjax", "nmjax.data", "nmjax.train")
# Helpers of NMTune's programs and runs, not for users.
NMTUNE_INTERNALS = ("single_threaded_lapack", "grid_table_epoch", "grid_online_epoch",
                    "table_epoch", "online_epoch", "initial_optimizer_state", "program_hparams",
                    "make_optimizer", "epoch_inputs")


@pytest.mark.parametrize("room", sorted(PUBLIC))
def test_each_public_name_imports_and_is_in_all(room):
  module = importlib.import_module(room)
  exported = getattr(module, "__all__", None)
  assert exported is not None, f"{room} has no __all__"
  for name in PUBLIC[room]:
    assert callable(getattr(module, name, None)) or name == "JOBS", f"{room}.{name} is missing"
    assert name in exported, f"{room}.__all__ lacks {name}"
  assert len(set(exported)) == len(exported), f"{room}.__all__ repeats a name"
  assert all(hasattr(module, name) for name in exported), f"{room}.__all__ names a missing name"


@pytest.mark.parametrize("room", sorted(PUBLIC) + list(EMPTY))
def test_star_import_brings_no_private_name(room):
  namespace = {}
  exec(f"from {room} import *", namespace)  # pylint: disable=exec-used
  private = sorted(n for n in namespace if n.startswith("_") and n != "__builtins__")
  assert not private, f"from {room} import * brings {private}"


@pytest.mark.parametrize("room", EMPTY)
def test_rooms_without_public_names_export_nothing(room):
  assert importlib.import_module(room).__all__ == []


def test_nmtune_exports_no_internals():
  exported = set(importlib.import_module("nmjax.nmtune").__all__)
  leaked = sorted(exported & set(NMTUNE_INTERNALS))
  assert not leaked, f"nmjax.nmtune.__all__ exports internals: {leaked}"
