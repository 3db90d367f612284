"""Test-wide setup: eight fake CPU devices, so sharded code paths run in-process.

Code that wants one device builds its mesh from jax.devices()[:1]; subprocesses (main.py runs)
get whatever their own environment says.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_num_cpu_devices", 8)
