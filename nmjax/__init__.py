"""nmjax: Noisy Model Learning in JAX/Flax.

Pre-train on data with controlled label noise, probe frozen features, and repair them with NMTune.
"""

__version__ = "0.1.0"
