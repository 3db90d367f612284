"""nmjax: Noisy Model Learning in JAX/Flax.

Pre-train on data with controlled label noise, probe frozen features, and repair them with NMTune.
The public API lives in the rooms, each with its `__all__` (import the room):
nmjax.noise, nmjax.spectral, nmjax.nmtune, nmjax.probe, nmjax.features, nmjax.clip,
nmjax.convert, nmjax.models.
"""

__version__ = "0.1.0"

__all__: list[str] = []  # Nothing is re-exported here: importing nmjax loads no room.
