"""The WebUI behind ``dpagg_core.webui.Host``: what dpagg asks of the running WebUI while it
trains (issue 19 item 4: split out of ``dpagg_webui_tab.py``). :class:`WebuiHost` reports
progress into the WebUI's progress bar, reads its Interrupt, moves the WebUI's model off the GPU
for a run (Forge's memory manager, A1111's ``sd_models``) and reloads every embedding database
after a release (:func:`reload_webui_embeddings`); :func:`loaded_model` is the loaded checkpoint
without triggering a load. Every WebUI module is imported when a function runs, never here.

How it loads: as ``dpagg_webui_html.py`` beside it (its docstring says why at length). A1111 and
Forge load EVERY ``.py`` of ``scripts/`` by its path, with the extension folder, never
``scripts/``, on ``sys.path`` (restored after each script), so the tab loads its own copy by path
(``_sibling``), and the WebUI's own load of this file is harmless: it defines functions and one
plain class (no ``Script`` subclass, no callback) and imports neither a WebUI module nor
``dpagg_core``.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any

api_embedding_dbs: list[Any] = []  # the API's own embedding database (Forge keeps a separate one)


def loaded_model() -> Any:
    """The WebUI's loaded model without triggering a load (None if none is loaded)."""
    from modules import sd_models

    data = getattr(sd_models, "model_data", None)
    model = getattr(data, "sd_model", None) if data is not None else None
    if model is None or getattr(model, "sd_checkpoint_info", None) is None:
        return None
    return model


def is_forge() -> bool:
    try:
        import backend.memory_management  # noqa: F401

        return True
    except ImportError:
        return False


def _call_reload(db: Any, *, sync: bool = False) -> None:
    """``load_textual_inversion_embeddings`` of A1111's database (``force_reload``; ``sync``:
    re-read the expected width from the loaded model, only for the model's own database) or of
    Forge's backend one (no arguments)."""
    fn = db.load_textual_inversion_embeddings
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {}
    if "force_reload" in params:
        kwargs["force_reload"] = True
    if "sync_with_sd_model" in params:
        kwargs["sync_with_sd_model"] = sync
    fn(**kwargs)


def reload_webui_embeddings() -> list[str]:
    """Reload every embedding database the WebUI uses, so a new file works without a restart:
    the loaded model's (Forge: its text-processing engines; A1111: ``sd_hijack``'s), the Extra
    Networks page's and the API's (``/sdapi/v1/embeddings``)."""
    done: list[str] = []
    model = loaded_model()
    for attr in ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g"):
        engine = getattr(model, attr, None) if model is not None else None
        if engine is not None and getattr(engine, "embeddings", None) is not None:
            _call_reload(engine.embeddings)
            done.append(f"model:{attr}")
    with contextlib.suppress(ImportError, AttributeError):
        from modules import sd_hijack

        db = sd_hijack.model_hijack.embedding_db
        if model is not None and not done:
            _call_reload(db, sync=True)
            done.append("sd_hijack")
    with contextlib.suppress(ImportError, AttributeError):
        from modules import ui_extra_networks_textual_inversion as extra

        if getattr(extra, "embedding_db", None) is not None:
            _call_reload(extra.embedding_db)
            done.append("extra_networks")
    for db in api_embedding_dbs:
        _call_reload(db)
        done.append("api")
    return done


class WebuiHost:
    """``dpagg_core.webui.Host`` over the running WebUI."""

    def __init__(self) -> None:
        from modules import devices, shared

        self.device = str(getattr(devices, "device", "cpu"))
        self.shared = shared  # its progress state and Interrupt

    def progress(self, done: int, total: int, text: str) -> None:
        st = self.shared.state
        st.job_count = 1
        st.job_no = 0
        st.sampling_steps = max(1, int(total))
        st.sampling_step = int(done)
        st.textinfo = text

    def cancelled(self) -> bool:
        return bool(getattr(self.shared.state, "interrupted", False))

    @contextlib.contextmanager
    def model_off_device(self):
        """Forge: its memory manager unloads every model from the GPU and loads the WebUI's model
        back by itself at the next generation. A1111: ``sd_models.send_model_to_cpu`` (lowvram
        aware) before, ``send_model_to_device`` after. Nothing to do on CPU."""
        if not self.device.startswith(("cuda", "xpu", "mps")):
            yield
            return
        from modules import sd_models

        model = loaded_model()
        if is_forge():
            from backend import memory_management

            memory_management.unload_all_models()
            memory_management.soft_empty_cache()
            yield
            return
        if model is not None:
            sd_models.send_model_to_cpu(model)
        try:
            yield
        finally:
            if model is not None:
                sd_models.send_model_to_device(model)

    def reload_embeddings(self, path: Path) -> None:
        done = reload_webui_embeddings()
        print(f"[dpagg] released {path.name}; reloaded embedding databases: {', '.join(done)}")

    def loaded_family(self) -> str | None:
        model = loaded_model()
        if model is None:
            return None
        if getattr(model, "is_sdxl", False):
            return "sdxl"
        if getattr(model, "is_sd2", False):
            return "sd2"
        if getattr(model, "is_sd1", False):
            return "sd1"
        return None
