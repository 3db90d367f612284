"""Training: the train state (state.py), jitted steps (steps.py, contrastive.py), the loop in
named steps (loop.py), orbax checkpoints (checkpoint.py), supervised pre-training
(supervised.py) and CLIP pre-training (clip_training.py). Import the submodules; this package
imports nothing on its own.
"""

__all__: list[str] = []
