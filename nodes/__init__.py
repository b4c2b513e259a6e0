"""dpagg's ComfyUI nodes (V3 API): Load Private Images, Per-Image TI, Clip Embeddings, Privacy
Accountant, Public Basis, DP Aggregate, Privacy Ledger, and for PUBLIC pictures Load Public
Images, Public Style (the small-set recipe in the graph) and Rehearse on Public Images.

Loaded by the pack's root ``__init__.py`` only when ComfyUI's ``comfy_api`` is importable. The
nodes are a thin skin over ``dpagg_core``; when the pack is cloned into ``custom_nodes/`` (not
pip-installed), its root is appended to ``sys.path`` so ``dpagg_core`` resolves to the pack's copy.
Appending (not prepending) keeps ComfyUI's own top-level ``nodes`` module first on the path.
Inside ComfyUI it also adds the Privacy Ledger's raise-budget route to ComfyUI's PromptServer.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PACK_ROOT = str(Path(__file__).resolve().parent.parent)
if importlib.util.find_spec("dpagg_core") is None and _PACK_ROOT not in sys.path:
    sys.path.append(_PACK_ROOT)

from comfy_api.latest import ComfyExtension, io  # noqa: E402

from .clip_embeddings import ClipEmbeddings  # noqa: E402
from .dp_aggregate import DPAggregate  # noqa: E402
from .ledger_node import NODES as LEDGER_NODES  # noqa: E402
from .ledger_node import register_routes  # noqa: E402
from .load_private_images import LoadPrivateImages  # noqa: E402
from .load_public_images import LoadPublicImages  # noqa: E402
from .per_image_ti import PerImageTI  # noqa: E402
from .privacy_accountant import PrivacyAccountant  # noqa: E402
from .public_basis import PublicBasisNode  # noqa: E402
from .public_style import PublicStyle  # noqa: E402
from .rehearse import Rehearse  # noqa: E402

# The nodes of the privacy flow and of its public side, one module each (the Privacy Ledger:
# ledger_node.py); the node ids saved workflows refer to are in each node's define_schema.
NODES: tuple[type[io.ComfyNode], ...] = (
    LoadPrivateImages,
    PerImageTI,
    ClipEmbeddings,
    PrivacyAccountant,
    PublicBasisNode,
    DPAggregate,
    LoadPublicImages,
    PublicStyle,
    Rehearse,
)

# The Privacy Ledger's "Raise budget..." route on ComfyUI's own server (no-op without one).
register_routes()


class DpaggExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*NODES, *LEDGER_NODES]


async def comfy_entrypoint() -> DpaggExtension:
    return DpaggExtension()


__all__ = ["DpaggExtension", "comfy_entrypoint", "NODES", "LEDGER_NODES"]
