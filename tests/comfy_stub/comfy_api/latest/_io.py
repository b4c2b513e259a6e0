"""Stand-in for ``comfy_api.latest.io`` with the names dpagg's nodes use (tests only).

Exactly as strict as ComfyUI 0.3.64's ``comfy_api/latest/_io.py`` (the snapshot in
``../shared/vendor``) for what it offers: every ``Input``/``Output`` takes the same parameters in
the same order, with no catch-all keywords (an unknown keyword is a ``TypeError``, as in ComfyUI),
and stores them under the same attribute names; ``GET_SCHEMA`` finalizes and validates the schema
(unique ids, default output ids, hidden inputs of output nodes) as ComfyUI does.
``tests/test_comfy_stub.py`` checks the signatures against the real module when ComfyUI is there.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import Any


class _IO_V3:  # noqa: N801 (ComfyUI's name)
    Parent: Any = None

    @property
    def io_type(self):
        return self.Parent.io_type


class Input(_IO_V3):
    def __init__(
        self,
        id: str,
        display_name: str = None,
        optional=False,
        tooltip: str = None,
        lazy: bool = None,
        extra_dict=None,
    ):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict if extra_dict is not None else {}

    def get_io_type(self):
        return self.io_type


class WidgetInput(Input):
    def __init__(
        self,
        id: str,
        display_name: str = None,
        optional=False,
        tooltip: str = None,
        lazy: bool = None,
        default: Any = None,
        socketless: bool = None,
        widget_type: str = None,
        force_input: bool = None,
        extra_dict=None,
    ):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input

    def get_io_type(self):
        return self.widget_type if self.widget_type is not None else super().get_io_type()


class Output(_IO_V3):
    def __init__(
        self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False
    ):
        self.id = id
        self.display_name = display_name
        self.tooltip = tooltip
        self.is_output_list = is_output_list

    def get_io_type(self):
        return self.io_type


def comfytype(io_type: str):
    """Bind ``io_type`` to the class and give it its own Input/Output subclasses (Parent set)."""

    def wrap(cls):
        cls.io_type = io_type
        base_in = cls.__dict__.get("Input", Input)
        base_out = cls.__dict__.get("Output", Output)
        cls.Input = type("Input", (base_in,), {"Parent": cls})
        cls.Output = type("Output", (base_out,), {"Parent": cls})
        return cls

    return wrap


def Custom(io_type: str):  # noqa: N802 (ComfyUI's name)
    @comfytype(io_type)
    class CustomComfyType:
        pass

    return CustomComfyType


@comfytype("BOOLEAN")
class Boolean:
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: bool = None,
            label_on: str = None,
            label_off: str = None,
            socketless: bool = None,
            force_input: bool = None,
        ):
            super().__init__(
                id, display_name, optional, tooltip, lazy, default, socketless, None, force_input
            )
            self.label_on = label_on
            self.label_off = label_off


class NumberDisplay(str, Enum):
    number = "number"
    slider = "slider"


@comfytype("INT")
class Int:
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: int = None,
            min: int = None,
            max: int = None,
            step: int = None,
            control_after_generate: bool = None,
            display_mode: NumberDisplay = None,
            socketless: bool = None,
            force_input: bool = None,
        ):
            super().__init__(
                id, display_name, optional, tooltip, lazy, default, socketless, None, force_input
            )
            self.min = min
            self.max = max
            self.step = step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode


@comfytype("FLOAT")
class Float:
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: float = None,
            min: float = None,
            max: float = None,
            step: float = None,
            round: float = None,
            display_mode: NumberDisplay = None,
            socketless: bool = None,
            force_input: bool = None,
        ):
            super().__init__(
                id, display_name, optional, tooltip, lazy, default, socketless, None, force_input
            )
            self.min = min
            self.max = max
            self.step = step
            self.round = round
            self.display_mode = display_mode


@comfytype("STRING")
class String:
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            multiline=False,
            placeholder: str = None,
            default: str = None,
            dynamic_prompts: bool = None,
            socketless: bool = None,
            force_input: bool = None,
        ):
            super().__init__(
                id, display_name, optional, tooltip, lazy, default, socketless, None, force_input
            )
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts


@comfytype("COMBO")
class Combo:
    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            options: list | type[Enum] = None,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: Any = None,
            control_after_generate: bool = None,
            upload: Any = None,
            image_folder: Any = None,
            remote: Any = None,
            socketless: bool = None,
        ):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [v.value for v in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(id, display_name, optional, tooltip, lazy, default, socketless)
            self.multiselect = False
            self.options = options
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote


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
    class Input(Input):
        """One input accepting several types; an Input given as ``id`` is copied and overrides
        the widget, its io_type first in the comma-joined list (as ComfyUI's get_io_type)."""

        def __init__(
            self,
            id: str | Input,
            types: list,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            extra_dict=None,
        ):
            self.input_override = None
            if isinstance(id, Input):
                self.input_override = copy.copy(id)
                optional = id.optional if id.optional is True else optional
                tooltip = id.tooltip if id.tooltip is not None else tooltip
                display_name = id.display_name if id.display_name is not None else display_name
                lazy = id.lazy if id.lazy is not None else lazy
                id = id.id
                if isinstance(self.input_override, WidgetInput):
                    self.input_override.widget_type = self.input_override.get_io_type()
            super().__init__(id, display_name, optional, tooltip, lazy, extra_dict)
            self._io_types = types

        @property
        def io_types(self) -> list:
            return [x if isinstance(x, type) else type(x) for x in self._io_types]

        def get_io_type(self):
            str_types = [x.io_type for x in self.io_types]
            if self.input_override is not None:
                str_types.insert(0, self.input_override.get_io_type())
            return ",".join(list(dict.fromkeys(str_types)))


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list = None
    outputs: list = None
    hidden: list = None
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self):
        """Ids unique among inputs, among outputs, and between the two (ComfyUI's checks)."""
        input_ids = [i.id for i in self.inputs] if self.inputs is not None else []
        output_ids = [o.id for o in self.outputs] if self.outputs is not None else []
        issues = []
        if len(set(input_ids)) != len(input_ids):
            dup = [k for k, c in Counter(input_ids).items() if c > 1]
            issues.append(f"Input ids must be unique, but {dup} are not.")
        if len(set(output_ids)) != len(output_ids):
            dup = [k for k, c in Counter(output_ids).items() if c > 1]
            issues.append(f"Output ids must be unique, but {dup} are not.")
        both = set(input_ids) & set(output_ids)
        if both:
            issues.append(f"Ids must be unique between inputs and outputs, but {both} are not.")
        if issues:
            raise ValueError("\n".join(issues))

    def finalize(self):
        if self.is_api_node:
            self.hidden = self.hidden or []
            for h in (Hidden.auth_token_comfy_org, Hidden.api_key_comfy_org):
                if h not in self.hidden:
                    self.hidden.append(h)
        if self.is_output_node:
            self.hidden = self.hidden or []
            for h in (Hidden.prompt, Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        if self.outputs is not None:
            for i, output in enumerate(self.outputs):
                if output.id is None:
                    output.id = f"_{i}_{output.io_type}_"


class NodeOutput:
    def __init__(
        self,
        *args: Any,
        ui: Any = None,
        expand: dict | None = None,
        block_execution: str | None = None,
    ):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index) -> Any:
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
    def FINALIZE_SCHEMA(cls) -> Schema:  # noqa: N802 (ComfyUI's name)
        schema = cls.define_schema()
        schema.finalize()
        return schema

    @classmethod
    def GET_SCHEMA(cls) -> Schema:  # noqa: N802 (ComfyUI's name)
        schema = cls.FINALIZE_SCHEMA()
        schema.validate()
        return schema
