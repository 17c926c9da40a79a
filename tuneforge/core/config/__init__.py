"""Typed configuration: the run configuration (``RunCfg`` and its sections) and the parser that
builds frozen dataclasses from YAML or plain data. Torch-free, so a config is checked in a fraction
of a second, before any model code loads."""

from tuneforge.core.config.parse import FromCli, Where, build, line_numbers
from tuneforge.core.config.run import (
                                  CompareCfg,
                                  DataCfg,
                                  EvalCfg,
                                  MethodCfg,
                                  RunCfg,
                                  TrainCfg,
                                  from_dict,
                                  from_yaml,
                                  method_config,
                                  to_dict,
                                  to_yaml,
                                  with_method,
)

__all__ = ["CompareCfg", "DataCfg", "EvalCfg", "FromCli", "MethodCfg", "RunCfg", "TrainCfg", "Where", "build",
           "from_dict", "from_yaml", "line_numbers", "method_config", "to_dict", "to_yaml", "with_method"]
