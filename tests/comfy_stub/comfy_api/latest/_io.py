"""Stand-in for ``comfy_api.latest.io`` with the names dpagg's nodes use (tests only).

Inputs/outputs only record their arguments, as ComfyUI's do; ``ComfyNode`` offers the class
methods ComfyUI calls (``define_schema``, ``validate_inputs``, ``execute``).
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Input:
    def __init__(self, id: str, **kwargs: Any) -> None:
        self.id = id
        self.optional = kwargs.pop("optional", False)
        self.kwargs = kwargs


class Output:
    def __init__(self, id: str | None = None, **kwargs: Any) -> None:
        self.id = id
        self.kwargs = kwargs


def comfytype(io_type: str):
    def wrap(cls):
        cls.io_type = io_type

        class _In(Input):
            pass

        class _Out(Output):
            pass

        _In.io_type = _Out.io_type = io_type
        cls.Input, cls.Output = _In, _Out
        return cls

    return wrap


def Custom(io_type: str):  # noqa: N802 (ComfyUI's name)
    @comfytype(io_type)
    class CustomType:
        pass

    return CustomType


@comfytype("INT")
class Int:
    pass


@comfytype("FLOAT")
class Float:
    pass


@comfytype("STRING")
class String:
    pass


@comfytype("BOOLEAN")
class Boolean:
    pass


@comfytype("COMBO")
class Combo:
    pass


@comfytype("IMAGE")
class Image:
    pass


@comfytype("MODEL")
class Model:
    pass


@comfytype("CLIP")
class Clip:
    pass


@comfytype("VAE")
class Vae:
    pass


@comfytype("CLIP_VISION")
class ClipVision:
    pass


@comfytype("CLIP_VISION_OUTPUT")
class ClipVisionOutput:
    pass


class MultiType:
    """``MultiType.Input(Image.Input("images"), types=[...])``: one input accepting several types;
    ``io_type`` is the comma-joined list, as ComfyUI's ``get_io_type`` reports it."""

    class Input(Input):
        def __init__(self, id: Any, types: list, **kwargs: Any) -> None:
            first = [id.io_type] if isinstance(id, Input) else []
            if isinstance(id, Input):
                kwargs = {**id.kwargs, "optional": id.optional, **kwargs}
                id = id.id
            super().__init__(id, **kwargs)
            self.types = types
            self.io_type = ",".join(dict.fromkeys(first + [t.io_type for t in types]))


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


@dataclass
class Schema:
    node_id: str
    display_name: str | None = None
    category: str = "sd"
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    hidden: list = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_experimental: bool = False
    not_idempotent: bool = False


class NodeOutput:
    def __init__(self, *args: Any, ui: dict | None = None, block_execution: str | None = None):
        self.args = args
        self.ui = ui
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if self.args else None

    def __getitem__(self, index: int) -> Any:
        return self.args[index]


class ComfyNode:
    hidden = None

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 (ComfyUI's name)
        return cls.define_schema()
