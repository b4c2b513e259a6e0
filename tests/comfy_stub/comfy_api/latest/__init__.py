"""Stand-in for ``comfy_api.latest``: ``ComfyExtension`` and ``io`` (tests only)."""

from abc import ABC, abstractmethod

from . import _io as io


class ComfyExtension(ABC):
    async def on_load(self) -> None:  # noqa: B027 (ComfyUI: optional hook)
        """Called when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list:
        """The node classes of the extension."""


__all__ = ["ComfyExtension", "io"]
