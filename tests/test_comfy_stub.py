"""The stand-in ``tests/comfy_stub/comfy_api`` is exactly as strict as the real ``comfy_api``.

``tests/test_nodes.py`` builds the node schemas against the stand-in (the real ``comfy_api`` needs
ComfyUI's own environment: av, aiohttp, ...). Every class the stand-in offers must take the same
parameters, in the same order, with the same defaults as ComfyUI's, and the schema dataclass the
same fields; the real module is read in ComfyUI's Python (``COMFYUI_DIR``, as in CI).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

STUB_IO = Path(__file__).resolve().parent / "comfy_stub" / "comfy_api" / "latest" / "_io.py"
COMFY = os.environ.get("COMFYUI_DIR")
CLASSES = [
    "Input",
    "WidgetInput",
    "Output",
    "Boolean.Input",
    "Int.Input",
    "Float.Input",
    "String.Input",
    "Combo.Input",
    "MultiType.Input",
    "NodeOutput",
    "Image.Input",
    "Model.Output",
]


def describe(io, classes):
    """Parameters (name, kind, default) of each class's __init__, and the schema's fields."""
    import dataclasses
    import inspect

    out = {}
    for name in classes:
        obj = io
        for part in name.split("."):
            obj = getattr(obj, part)
        params = list(inspect.signature(obj.__init__).parameters.values())[1:]
        out[name] = [[p.name, p.kind.name, repr(p.default)] for p in params]
    out["Schema"] = [f.name for f in dataclasses.fields(io.Schema)]
    out["Hidden"] = {h.name: h.value for h in io.Hidden}
    out["NodeOutput.__getitem__"] = hasattr(io.NodeOutput, "__getitem__")
    out["Custom"] = sorted(k for k in ("Input", "Output") if hasattr(io.Custom("X"), k))
    return out


def load_stub():
    spec = importlib.util.spec_from_file_location("_dpagg_stub_io", STUB_IO)
    io = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = io  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(io)
    finally:
        del sys.modules[spec.name]
    return io


def stub_description() -> dict:
    return json.loads(json.dumps(describe(load_stub(), CLASSES)))


def test_stub_rejects_unknown_keywords_and_checks_ids():
    io = load_stub()
    with pytest.raises(TypeError):
        io.Float.Input("x", default=1.0, nonsense=3)
    with pytest.raises(TypeError):
        io.Combo.Input("c", options=["a"], force_input=True)  # ComfyUI's Combo has no such one
    custom = io.Custom("THING")

    class Node(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="N",
                inputs=[custom.Input("a"), io.Int.Input("a")],
                outputs=[custom.Output()],
                is_output_node=True,
            )

    with pytest.raises(ValueError, match="unique"):
        Node.GET_SCHEMA()
    schema = Node.FINALIZE_SCHEMA()
    assert schema.outputs[0].id == "_0_THING_"
    assert {io.Hidden.prompt, io.Hidden.extra_pnginfo} <= set(schema.hidden)


@pytest.mark.comfyui
@pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR to a ComfyUI checkout to run")
def test_stub_signatures_equal_the_real_comfy_api():
    venv = Path(COMFY) / ".venv" / "bin" / "python"
    python = os.environ.get("COMFYUI_PYTHON") or (str(venv) if venv.exists() else sys.executable)
    code = (
        "import json, sys\n"
        + inspect.getsource(describe)
        + f"sys.path.insert(0, {COMFY!r})\n"
        + "from comfy_api.latest import io\n"
        + f"print(json.dumps(describe(io, {CLASSES!r})))\n"
    )
    res = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, cwd=COMFY, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    real = json.loads(res.stdout.strip().splitlines()[-1])
    stub = stub_description()
    for name in CLASSES + ["Schema", "NodeOutput.__getitem__", "Custom"]:
        assert stub[name] == real[name], name
    assert stub["Hidden"].items() <= real["Hidden"].items()
