"""dpagg ComfyUI node pack entry point.

ComfyUI imports this file from ``custom_nodes/``. Outside ComfyUI (``comfy_api`` not importable)
nothing is registered, so the package and ``dpagg_core`` stay importable as a plain library.
"""

import importlib.util

WEB_DIRECTORY = "./js"
__all__ = ["WEB_DIRECTORY"]

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

    __all__ += ["comfy_entrypoint"]
