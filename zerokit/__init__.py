"""zerokit: train models larger than GPU memory allows, with ZeRO sharding, offload and activation memory management."""
from zerokit.api import initialize
from zerokit.config import Config, ConfigError
from zerokit.engine import Engine

__all__ = ["initialize", "Config", "ConfigError", "Engine"]
__version__ = "0.1.0"
