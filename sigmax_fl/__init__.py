"""sigmax-fl: SIGMAX trading instances train one shared PyTorch model with Flower."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["FederatedConfig", "TradingModel", "__version__", "create_fl_manager"]


def __getattr__(name: str) -> Any:
    # Lazy: `import sigmax_fl.deploy` (process orchestration) should not pay for torch.
    if name == "TradingModel":
        from sigmax_fl.model import TradingModel

        return TradingModel
    if name in ("FederatedConfig", "create_fl_manager"):
        from sigmax_fl import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'sigmax_fl' has no attribute {name!r}")
