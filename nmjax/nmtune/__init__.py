"""NMTune: a residual MLP head over frozen features, trained with three spectral regularizers, on
plain features or on augmented views of the train images; one configuration at a time or a grid
of them in one jitted program (the method: docs/method.md).

    result = nmjax.nmtune.fit((train_features, train_labels), (test_features, test_labels))
    head = result["head"]  # nmjax.heads.Head: predict, transform (z), save; heads.export

The public API is __all__: the three regularizers, the head, the fits, their config, and the
augmented-view train data. Everything else is imported from its module: losses (the regularizers
and the singular-value routes), head (the module), views (augmented views and each epoch's draws),
programs (the jitted epochs and inference), runs (validated runs, the validation split, the epoch
loop), grid (the grid syntax and the choice on validation), fit (the config and the methods).
"""

from nmjax.nmtune.fit import (default_config, fit, fit_grid, fit_grid_multi, fit_multi,
                              resolve_config)
from nmjax.nmtune.head import NMTuneHead
from nmjax.nmtune.losses import consistency_loss, covariance_loss, dominant_singular_value_loss
from nmjax.nmtune.views import CachedViews, OnlineViews, cache_views

__all__ = [
    "CachedViews", "NMTuneHead", "OnlineViews", "cache_views", "consistency_loss",
    "covariance_loss", "default_config", "dominant_singular_value_loss", "fit", "fit_grid",
    "fit_grid_multi", "fit_multi", "resolve_config",
]
