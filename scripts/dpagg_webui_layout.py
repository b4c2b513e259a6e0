"""The "Private style (DP)" tab's Gradio layout and its Settings > dpagg page (issue 19 item 4).

``dpagg_webui_tab.py`` talks to the WebUI (its host, the actions, the ``/dpagg/v1`` routes) and
registers the callbacks with ``script_callbacks``; this file only builds the Blocks: every field,
its label and element id (the browser tests and ``javascript/dpagg_webui.js`` find them by id and
label), the debounced plan refresh and the buttons. :func:`build_tab` receives the handlers it
wires (``plan``, ``tab_run``, ``tab_suggest``, ``tab_rehearse``, the Interrupt) and the tab's
HTML module from the tab, so this file imports nothing of the tab (no cycle) and nothing of it
needs a WebUI to be tested. The seam is the tab's own: what the user sees and clicks here, what
the WebUI does with it there.

How it loads: as ``dpagg_webui_html.py`` beside it (its docstring says why at length). A1111 and
Forge load EVERY ``.py`` of ``scripts/`` by its path, with the extension folder, never
``scripts/``, on ``sys.path`` (restored after each script), so the tab loads its own copy by path
(``_sibling``), and the WebUI's own load of this file is harmless: it defines functions only (no
``Script`` class, no callback), and imports neither Gradio, a WebUI module nor ``dpagg_core``
until a function is called (by then the tab has imported ``dpagg_core``, whose ``__init__``
appended the ``_deps`` folder that holds dp-accounting).
"""

from __future__ import annotations

import html
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

TAB_LABEL = "Private style (DP)"

_FIELD_ORDER = (
    "images",
    "checkpoint",
    "name",
    "mode",
    "epsilon",
    "noise_multiplier",
    "delta",
    "sampling",
    "m",
    "q",
    "releases",
    "clip_norm",
    "public_images",
    "quantile",
    "public_style_folder",
    "public_style_k",
    "clip_norm_from_style",
    "budget_epsilon",
    "budget_delta",
    "steps",
    "learning_rate",
    "vectors",
    "initializer",
    "templates",
    "resolution",
    "batch_size",
    "seed",
    "preview",
    "preview_steps",
    "preview_size",
)


_CHOICE_FIELDS = frozenset(
    {"checkpoint", "mode", "sampling", "templates", "preview", "clip_norm_from_style"}
)


def _js_kwargs(component: Any, fn_name: str) -> dict[str, str]:
    """gradio 3 (A1111 1.10) calls the client-side hook ``_js``, gradio 4 (Forge) ``js``."""
    params = inspect.signature(component.click).parameters
    return {"js": fn_name} if "js" in params else {"_js": fn_name}


def error_tab(message: str, elem: str) -> list[tuple[Any, str, str]]:
    """The tab of a broken install: the error (escaped) and nothing else."""
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.HTML(f"<div style='color:#d33'>{html.escape(message)}</div>")
    return [(tab, TAB_LABEL, elem)]


def build_tab(
    *,
    elem: str,
    views: Any,
    roots: Sequence[Path],
    checkpoints: Sequence[str],
    loaded_checkpoint: str | None,
    plan: Callable[[dict[str, Any]], dict[str, Any]],
    tab_run: Callable[[dict[str, Any]], tuple[str | None, str, str]],
    tab_suggest: Callable[[dict[str, Any]], tuple[float | None, str]],
    tab_rehearse: Callable[[dict[str, Any]], tuple[str | None, str]],
    interrupt: Callable[[], Any],
) -> list[tuple[Any, str, str]]:
    """The tab for ``script_callbacks.on_ui_tabs``: ``elem`` prefixes every element id;
    ``views`` is the tab's HTML module; ``roots`` the image roots (the first is the placeholder);
    ``checkpoints`` the WebUI's list and ``loaded_checkpoint`` its current one; the handlers take
    the fields' values by name (:data:`_FIELD_ORDER`)."""
    import gradio as gr
    from modules.call_queue import wrap_gradio_gpu_call

    from dpagg_core import options
    from dpagg_core import webui as core

    d = core.Settings()
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column(scale=3):
                comps: dict[str, Any] = {}
                comps["images"] = gr.Textbox(
                    label="Private image folder (never leaves this machine)",
                    placeholder=str(roots[0] / "my-style"),
                    info=f"a folder under {', '.join(map(str, roots))} "
                    "(Settings > dpagg lists the folders dpagg may read)",
                    elem_id=f"{elem}_images",
                )
                with gr.Row():
                    choices = list(checkpoints)
                    comps["checkpoint"] = gr.Dropdown(
                        label="Checkpoint (default: the loaded one)",
                        choices=choices,
                        value=loaded_checkpoint if choices else None,
                        elem_id=f"{elem}_checkpoint",
                    )
                    comps["name"] = gr.Textbox(
                        label="Embedding name (the prompt word)", value=d.name
                    )
                with gr.Row():
                    comps["mode"] = gr.Radio(
                        label="Privacy target",
                        choices=[core.MODE_EPSILON, core.MODE_NOISE],
                        value=d.mode,
                        elem_id=f"{elem}_mode",
                    )
                    shown = core.target_fields(d.mode)  # the target not chosen is hidden
                    comps["epsilon"] = gr.Number(
                        label="epsilon",
                        value=d.epsilon,
                        visible=shown["epsilon"],
                        elem_id=f"{elem}_epsilon",
                    )
                    comps["noise_multiplier"] = gr.Number(
                        label="noise multiplier",
                        value=d.noise_multiplier,
                        visible=shown["noise_multiplier"],
                        elem_id=f"{elem}_noise_multiplier",
                    )
                    comps["delta"] = gr.Number(label="delta", value=d.delta)
                with gr.Row():
                    comps["sampling"] = gr.Dropdown(
                        label="Sampling", choices=list(options.SAMPLINGS), value=d.sampling
                    )
                    comps["m"] = gr.Number(label="m (wor)", value=d.m, precision=0)
                    comps["q"] = gr.Number(label="q (poisson)", value=d.q)
                    comps["releases"] = gr.Number(label="releases", value=d.releases, precision=0)
                with gr.Row():
                    comps["clip_norm"] = gr.Number(label="Clip norm C (public)", value=d.clip_norm)
                    comps["public_images"] = gr.Textbox(
                        label="PUBLIC folder for the clip-norm suggestion", placeholder="/path"
                    )
                    comps["quantile"] = gr.Number(label="quantile", value=d.quantile)
                    suggest_btn = gr.Button("Suggest C from the public folder")
                with gr.Row():
                    comps["budget_epsilon"] = gr.Number(
                        label=core.BUDGET_LABEL,
                        info=core.BUDGET_INFO,
                        value=0,
                        elem_id=f"{elem}_budget_epsilon",
                    )
                    comps["budget_delta"] = gr.Number(label="budget delta (0 = keep)", value=0)
                with gr.Accordion("Public style folder (the recipe for small sets)", open=False):
                    with gr.Row():
                        comps["public_style_folder"] = gr.Textbox(
                            label="PUBLIC style folder (empty: release in the full space)",
                            info=core.STYLE_INFO,
                            placeholder="/path",
                            elem_id=f"{elem}_public_style_folder",
                        )
                        comps["public_style_k"] = gr.Number(
                            label="k per vector (0 = choose on the style subfolders)",
                            value=d.public_style_k,
                            precision=0,
                        )
                        comps["clip_norm_from_style"] = gr.Checkbox(
                            label="C from the style folder (off: the C field)",
                            value=d.clip_norm_from_style,
                        )
                with gr.Accordion("Rehearse on public images (spends nothing)", open=False):
                    gr.HTML(views.rehearse_info_html())
                    with gr.Row():
                        rehearse_folder = gr.Textbox(
                            label="PUBLIC rehearsal folder",
                            placeholder="/path",
                            elem_id=f"{elem}_rehearse_folder",
                        )
                        rehearse_n = gr.Number(
                            label="n (the size of your private set)", value=10, precision=0
                        )
                        rehearse_draws = gr.Number(
                            label="noise draws per epsilon", value=2, precision=0
                        )
                        rehearse_btn = gr.Button("Rehearse", elem_id=f"{elem}_rehearse")
                    rehearse_grid = gr.Image(
                        label="Rehearsal: without | non-private | three epsilons",
                        interactive=False,
                        elem_id=f"{elem}_rehearse_grid",
                    )
                    rehearse_html = gr.HTML(elem_id=f"{elem}_rehearse_result")
                with gr.Accordion("Per-image textual inversion", open=False):
                    with gr.Row():
                        comps["steps"] = gr.Number(label="TI steps", value=d.steps, precision=0)
                        comps["learning_rate"] = gr.Number(
                            label="learning rate", value=d.learning_rate
                        )
                        comps["vectors"] = gr.Number(
                            label="vectors per token", value=d.vectors, precision=0
                        )
                        comps["initializer"] = gr.Textbox(
                            label="initializer word (public centre)", value=d.initializer
                        )
                    with gr.Row():
                        comps["templates"] = gr.Dropdown(
                            label="templates",
                            choices=list(options.TEMPLATE_KINDS),
                            value=d.templates,
                        )
                        comps["resolution"] = gr.Number(
                            label="resolution (0 = the model's)", value=0, precision=0
                        )
                        comps["batch_size"] = gr.Number(
                            label="batch size", value=d.batch_size, precision=0
                        )
                        comps["seed"] = gr.Number(
                            label="training seed (TI randomness only)", value=0, precision=0
                        )
                with gr.Accordion("Preview grid", open=False):
                    with gr.Row():
                        comps["preview"] = gr.Checkbox(label="with/without preview", value=True)
                        comps["preview_steps"] = gr.Number(
                            label="preview steps", value=d.preview_steps, precision=0
                        )
                        comps["preview_size"] = gr.Number(
                            label="preview size (0 = the model's)", value=0, precision=0
                        )
            with gr.Column(scale=2):
                plan_html = gr.HTML(
                    views.plan_html({"ok": False, "hint": True}), elem_id=f"{elem}_plan"
                )
                with gr.Row():
                    run_btn = gr.Button(
                        "Train and release", variant="primary", elem_id=f"{elem}_run"
                    )
                    stop_btn = gr.Button("Interrupt", elem_id=f"{elem}_interrupt")
                # the WebUI's progress bar is drawn (position: absolute) in the anchor's parent:
                # a "progress-container" row (the WebUI's class, position: relative) keeps it
                # above the progress text instead of over the plan at the top of the column
                with gr.Row(elem_classes="progress-container"):
                    gr.HTML(elem_id=f"{elem}_progress")
                preview = gr.Image(
                    label="Preview: without | with the embedding",
                    show_label=False,  # gradio 4 draws it over the grid's own "without" label
                    interactive=False,
                    elem_id=f"{elem}_preview",
                )
                result_html = gr.HTML(elem_id=f"{elem}_result")
        id_task = gr.Textbox(visible=False, elem_id=f"{elem}_id_task")
        inputs = [comps[k] for k in _FIELD_ORDER]

        def values_of(args: tuple) -> dict[str, Any]:
            return dict(zip(_FIELD_ORDER, args, strict=True))

        def refresh_plan(*args: Any) -> tuple[str, Any]:
            """The plan for the fields (the last input is the result box): a refusal made for
            other values is cleared (``views.stale_refusal``), anything else is kept."""
            values = values_of(args[:-1])
            stale = views.stale_refusal(args[-1], values)
            return plan(values)["html"], (gr.update(value="") if stale else gr.update())

        replan_in, replan_out = [*inputs, result_html], [plan_html, result_html]
        for key in _FIELD_ORDER:  # debounced: core.PLAN_EVENTS (no scan per keystroke)
            kind = "choice" if key in _CHOICE_FIELDS else "text"
            for event in core.PLAN_EVENTS[kind]:
                if event == "blur" and isinstance(comps[key], gr.Number):
                    continue  # gradio 4's Number has no blur event: javascript/dpagg_webui.js
                listener = getattr(comps[key], event, None)
                if listener is not None:
                    listener(fn=refresh_plan, inputs=replan_in, outputs=replan_out)
        # A number field that is left (blur): dpaggNumberLeft (javascript/dpagg_webui.js) clicks
        # this hidden button, the same in gradio 3 (A1111) and 4 (Forge, whose gr.Number has no
        # blur event, so a typed budget or epsilon was not planned until Enter or the next run)
        replan_btn = gr.Button(visible=False, elem_id=f"{elem}_replan")
        replan_btn.click(fn=refresh_plan, inputs=replan_in, outputs=replan_out)

        def show_target(mode: str):
            shown = core.target_fields(mode)
            return gr.update(visible=shown["epsilon"]), gr.update(visible=shown["noise_multiplier"])

        comps["mode"].change(
            fn=show_target,
            inputs=[comps["mode"]],
            outputs=[comps["epsilon"], comps["noise_multiplier"]],
        )

        def do_run(_id_task: str, *args: Any):
            return tab_run(values_of(args))

        run_btn.click(
            fn=wrap_gradio_gpu_call(do_run, extra_outputs=[None, gr.update()]),
            inputs=[id_task, *inputs],
            outputs=[preview, plan_html, result_html],
            **_js_kwargs(run_btn, "dpaggStartRun"),
        ).then(  # a release: refresh the Extra Networks panes so its card shows at once
            fn=None, inputs=[result_html], outputs=[], **_js_kwargs(run_btn, "dpaggAfterRun")
        )

        def do_suggest(_id_task: str, *args: Any):
            clip_norm, text = tab_suggest(values_of(args))
            return (gr.update() if clip_norm is None else clip_norm), text

        suggest_btn.click(
            fn=wrap_gradio_gpu_call(do_suggest, extra_outputs=[gr.update()]),
            inputs=[id_task, *inputs],
            outputs=[comps["clip_norm"], result_html],
            **_js_kwargs(suggest_btn, "dpaggStartRun"),
        ).then(fn=refresh_plan, inputs=replan_in, outputs=replan_out)  # C was set, not typed

        def do_rehearse(_id_task: str, folder: str, n: Any, draws: Any, *args: Any):
            asked = {"public_folder": folder, "n": n, "draws": draws}
            return tab_rehearse(values_of(args) | asked)

        rehearse_btn.click(
            fn=wrap_gradio_gpu_call(do_rehearse, extra_outputs=[gr.update()]),
            inputs=[id_task, rehearse_folder, rehearse_n, rehearse_draws, *inputs],
            outputs=[rehearse_grid, rehearse_html],
            **_js_kwargs(rehearse_btn, "dpaggStartRun"),
        )
        stop_btn.click(fn=interrupt, inputs=[], outputs=[])
    return [(tab, TAB_LABEL, elem)]


def add_settings(shared: Any) -> None:
    """Settings > dpagg (the image roots, the epsilon cap) on the WebUI's ``shared``; not
    settable through ``/sdapi/v1/options`` (``restrict_api``) where the WebUI knows it."""
    import gradio as gr

    from dpagg_core import webui_access as access

    def option(default: Any, label: str, component: Any, args: dict | None, info: str) -> Any:
        kwargs = {"section": access.SETTINGS_SECTION, "restrict_api": True}
        try:
            made = shared.OptionInfo(default, label, component, args, **kwargs)
        except TypeError:  # an older WebUI without restrict_api
            kwargs.pop("restrict_api")
            made = shared.OptionInfo(default, label, component, args, **kwargs)
        return made.info(info) if hasattr(made, "info") else made

    shared.opts.add_option(
        access.SETTING_ROOTS,
        option(
            "",
            access.SETTING_ROOTS_LABEL,
            gr.Textbox,
            {"lines": 2},
            f"private and public; one per line; empty: <data dir>/{access.DEFAULT_ROOT_NAME}",
        ),
    )
    shared.opts.add_option(
        access.SETTING_MAX_EPSILON,
        option(
            0.0,
            access.SETTING_MAX_EPSILON_LABEL,
            gr.Number,
            None,
            "a request above it is refused before anything is trained or spent",
        ),
    )
