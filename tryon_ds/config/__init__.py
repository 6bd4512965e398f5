"""One typed configuration tree for the whole trainer, built once from a file plus command-line overrides and
validated before anything runs; every user error is a :class:`ConfigError` whose message names the key, the
value and what is allowed.

- ``schema``: the tree (``Config`` and its sections, each UNet a ``UNetSpec`` from tryon_ds/model/) and the
  checks that span keys;
- ``legacy``: the keys of files written before the list ``unets`` and of the training guide's config.json,
  upgraded at load (command lines may use either: ``--set unet2.dim=64`` or ``--set unets.1.dim=64``);
- ``typed``: a mapping of keys made into the tree, type and bounds checked;
- ``load``: files, overrides and the command line's flags.
"""
from .load import (add_config_args, build_config, config_from_args, deep_merge, find_config_file, parse_override,
                   read_config_file, with_overrides)
from .schema import Config, DataConfig, DiffusionConfig, LoggingConfig, default_cascade, preset

__all__ = ["Config", "DataConfig", "DiffusionConfig", "LoggingConfig", "add_config_args", "build_config",
           "config_from_args", "deep_merge", "default_cascade", "find_config_file", "parse_override", "preset",
           "read_config_file", "with_overrides"]
