"""NMTune (REFERENCE.md s.4): a residual MLP head over frozen features, trained with three
spectral regularizers, on plain features or on augmented views of the train images; one
configuration at a time or a grid of them in one jitted program.

losses: the regularizers and the singular-value routes; head: the module; views: augmented views
and each epoch's draws; programs: the jitted epochs (one configuration or K) and inference;
runs: validated runs, the validation split and the epoch loop; grid: the grid syntax and the
choice on validation; fit: the config, the methods and fit, fit_multi, fit_grid.
"""

from nmjax.nmtune.fit import (METHODS, default_config, fit, fit_grid, fit_grid_multi, fit_multi,
                              loss_weights, probe_config, resolve_config)
from nmjax.nmtune.grid import (GRID_FIELDS, ONE_PROGRAM_FIELDS, choose, parse_grid, point_configs,
                              report_lines)
from nmjax.nmtune.head import NMTuneHead, init_variables, parameter_count
from nmjax.nmtune.losses import (COVARIANCE_ROUTES, FASTEST_SINGULAR_VALUE_ROUTE,
                                 SINGULAR_VALUE_ROUTES, consistency_loss, covariance_loss,
                                 dominant_share, dominant_singular_value_loss,
                                 gram_singular_values, normalize_rows, singular_value_route,
                                 singular_values)
from nmjax.nmtune.programs import (HPARAMS, LOSS_TERMS, TRACES, ProgramSpec, State,
                                   initial_optimizer_state,
                                   grid_online_epoch, grid_predict, grid_table_epoch, loss_terms,
                                   make_optimizer, online_epoch, predict, predict_all,
                                   program_hparams, table_epoch)
from nmjax.nmtune.runs import TrainLike, single_threaded_lapack, validation_split
from nmjax.nmtune.views import (AUGMENT_DRAWS, CROP_RATIO, CROP_SCALE, CachedViews, Encode,
                                OnlineViews, cache_views, encode_augmented, epoch_inputs,
                                random_resized_crop_flip)

__all__ = [
    "AUGMENT_DRAWS", "COVARIANCE_ROUTES", "CROP_RATIO", "CROP_SCALE", "CachedViews", "Encode",
    "FASTEST_SINGULAR_VALUE_ROUTE", "GRID_FIELDS", "HPARAMS", "LOSS_TERMS", "METHODS",
    "NMTuneHead", "ONE_PROGRAM_FIELDS", "OnlineViews", "ProgramSpec", "SINGULAR_VALUE_ROUTES",
    "State", "TRACES", "TrainLike", "cache_views", "choose", "consistency_loss",
    "covariance_loss", "default_config", "dominant_share", "dominant_singular_value_loss",
    "encode_augmented", "epoch_inputs", "fit", "fit_grid", "fit_grid_multi", "fit_multi",
    "gram_singular_values", "grid_online_epoch", "grid_predict", "grid_table_epoch",
    "init_variables", "initial_optimizer_state", "loss_terms", "loss_weights",
    "make_optimizer", "normalize_rows", "online_epoch", "parameter_count", "parse_grid",
    "point_configs", "predict", "predict_all", "probe_config",
    "program_hparams", "random_resized_crop_flip", "report_lines", "resolve_config",
    "single_threaded_lapack", "singular_value_route", "singular_values", "table_epoch",
    "validation_split",
]
