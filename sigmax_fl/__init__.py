"""sigmax-fl: SIGMAX trading instances train one shared PyTorch model with Flower."""

from sigmax_fl.model import TradingModel

__version__ = "0.1.0"

__all__ = ["TradingModel", "__version__"]
