"""NMTune (REFERENCE.md s.4): a residual MLP head over frozen features, trained with three
spectral regularizers, on plain features or on augmented views of the train images.

losses: the regularizers; head: the module; views: augmented views and each epoch's draws;
programs: the jitted epochs and inference; fit: the config, the methods and the fit itself.
"""

from nmjax.nmtune.fit import (METHODS, TrainLike, default_config, fit, fit_multi, loss_weights,
                              probe_config, resolve_config, single_threaded_lapack)
from nmjax.nmtune.head import NMTuneHead, init_variables
from nmjax.nmtune.losses import (COVARIANCE_ROUTES, consistency_loss, covariance_loss,
                                 dominant_singular_value_loss, normalize_rows, singular_values)
from nmjax.nmtune.programs import (LOSS_TERMS, TRACES, ProgramSpec, State, loss_terms,
                                   make_optimizer, online_epoch, predict, predict_all,
                                   table_epoch)
from nmjax.nmtune.views import (AUGMENT_DRAWS, CROP_RATIO, CROP_SCALE, CachedViews, Encode,
                                OnlineViews, cache_views, encode_augmented, epoch_inputs,
                                random_resized_crop_flip)

__all__ = [
    "AUGMENT_DRAWS", "COVARIANCE_ROUTES", "CROP_RATIO", "CROP_SCALE", "CachedViews", "Encode",
    "LOSS_TERMS", "METHODS", "NMTuneHead", "OnlineViews", "ProgramSpec", "State", "TRACES",
    "TrainLike", "cache_views", "consistency_loss", "covariance_loss", "default_config",
    "dominant_singular_value_loss", "encode_augmented", "epoch_inputs", "fit", "fit_multi",
    "init_variables", "loss_terms", "loss_weights", "make_optimizer", "normalize_rows",
    "online_epoch", "predict", "predict_all", "probe_config", "random_resized_crop_flip",
    "resolve_config", "single_threaded_lapack", "singular_values", "table_epoch",
]
