"""dpagg core: differentially private aggregation of per-image embeddings (DPAgg-TI).

Never imports ComfyUI; the node pack in ``nodes/`` is a thin skin over this package.
"""

__version__ = "0.1.0"


def _add_pack_deps() -> None:
    """Make dp-accounting importable when the pack's ``install.py`` put it in ``<pack>/_deps``.

    dp-accounting pins attrs<24 in every release, so ``install.py`` does not install it into the
    host's environment (ComfyUI and the WebUI have a newer attrs, and ``pip check`` would
    complain): it installs it with ``--no-deps --target <pack>/_deps``, a git-ignored folder pip
    does not see. That folder is APPENDED to ``sys.path``, and only when it exists and
    ``dp_accounting`` is not importable otherwise (a pip-installed dpagg, the dev venv), so it
    never shadows an installed package. Covers the ComfyUI nodes, the WebUI tab and
    ``python -m dpagg_core.cli`` run from the pack folder.
    """
    import importlib.util
    import sys
    from pathlib import Path

    deps = str(Path(__file__).resolve().parent.parent / "_deps")
    if deps in sys.path or not Path(deps).is_dir():
        return
    if importlib.util.find_spec("dp_accounting") is None:
        sys.path.append(deps)


_add_pack_deps()
