"""sigmax-fl: SIGMAX trading instances train one shared PyTorch model with Flower."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["TradingModel", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy: `import sigmax_fl.deploy` (process orchestration) should not pay for torch.
    if name == "TradingModel":
        from sigmax_fl.model import TradingModel

        return TradingModel
    raise AttributeError(f"module 'sigmax_fl' has no attribute {name!r}")
