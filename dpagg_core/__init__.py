"""dpagg core: differentially private aggregation of per-image embeddings (DPAgg-TI).

Never imports ComfyUI; the node pack in ``nodes/`` is a thin skin over this package.
"""

__version__ = "0.1.0"
