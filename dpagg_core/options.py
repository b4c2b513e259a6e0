"""The choices a user can make, in one light bottom-layer table (no torch, no numpy).

The core validates against these tuples (each is re-exported by the module that owns its
meaning: ``aggregate.release.CENTRES``, ``privacy.mechanism.CLIP_MODES``, ...) and every front end
offers exactly them: the CLI's ``choices=``, the WebUI tab's dropdowns and the nodes' combos read
this module, so a new choice is added once. Light on purpose: ``dpagg --help`` builds every
parser without importing the training stack.
"""

from __future__ import annotations

SAMPLINGS: tuple[str, ...] = ("full", "wor", "poisson")
CENTRES: tuple[str, ...] = ("initializer", "origin", "public_mean")
CLIP_MODES: tuple[str, ...] = ("clip", "normalize")
POSTPROCESS: tuple[str, ...] = ("none", "js", "norm", "js+norm")
# Post-processing that needs a public prior object (Python API only: no front end builds one yet,
# so none offers them; ``aggregate.postprocess.METHODS`` is both tuples).
POSTPROCESS_WITH_PRIOR: tuple[str, ...] = ("wiener", "wiener+norm")
TEMPLATE_KINDS: tuple[str, ...] = ("style", "object")
MIXED_PRECISIONS: tuple[str, ...] = ("no", "bf16", "fp16")
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
TI_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")
METHODS: tuple[str, ...] = ("ti", "clip", "dpsgd")
OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
BASIS_KINDS: tuple[str, ...] = ("token_table", "public_embeddings")
