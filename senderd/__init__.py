"""senderd: a sender to SAP Cloud Integration integration flows, safe and unattended."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Client", "SendResult", "__version__"]

if TYPE_CHECKING:
    from senderd.client import Client
    from senderd.result import SendResult


def __getattr__(name: str) -> Any:
    """Import the library API lazily, so `import senderd` stays cheap for the CLI."""
    if name == "Client":
        from senderd.client import Client

        return Client
    if name == "SendResult":
        from senderd.result import SendResult

        return SendResult
    raise AttributeError(name)
