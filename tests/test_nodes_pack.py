"""The pack as a whole, ComfyUI absent: the root ``__init__`` without ComfyUI, the entrypoint and
its node ids, the example workflows, the frontend extension, the public UI payload and paths.
Shared helpers: ``tests/nodes_fixtures.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from nodes_fixtures import (
    REPO,
    aggregate,
    ti_set,
    widget_ids,
)

from dpagg_core.privacy import calibration


def test_root_init_imports_without_comfyui():
    """The pack's root __init__ registers nothing without ComfyUI; dpagg_core stays usable."""
    code = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('comfy_api') is None\n"
        "spec = importlib.util.spec_from_file_location('dpagg_pack', "
        f"{str(REPO / '__init__.py')!r}, submodule_search_locations=[{str(REPO)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['dpagg_pack'] = m\n"
        "spec.loader.exec_module(m)\n"
        "assert m.WEB_DIRECTORY == './js' and not hasattr(m, 'comfy_entrypoint'), dir(m)\n"
        "assert 'dpagg_pack.nodes' not in sys.modules\n"
        "import dpagg_core.aggregate.release\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_entrypoint_lists_the_nodes_with_types(pack):
    import asyncio

    ext = asyncio.run(pack["nodes"].comfy_entrypoint())
    nodes = asyncio.run(ext.get_node_list())
    schemas = {n.define_schema().node_id: n.define_schema() for n in nodes}
    assert set(schemas) == {
        "DpaggLoadPrivateImages",
        "DpaggPerImageTI",
        "DpaggClipEmbeddings",
        "DpaggPrivacyAccountant",
        "DpaggPublicBasis",
        "DpaggAggregate",
        "DpaggPrivacyLedger",
        "DpaggLoadPublicImages",
        "DpaggPublicStyle",
        "DpaggRehearse",
    }
    assert {s.category for s in schemas.values()} == {"dpagg/privacy"}

    def types(items):
        return [i.get_io_type() for i in items]

    loader = schemas["DpaggLoadPrivateImages"]
    assert [i.id for i in loader.inputs] == ["folder", "resolution"]
    assert types(loader.outputs) == ["PRIVATE_IMAGES"]
    ti_s = schemas["DpaggPerImageTI"]
    images = "IMAGE,PRIVATE_IMAGES"  # Load Private Images, or any IMAGE batch / list
    # Per-Image TI also trains Load Public Images' pictures (for Public Style and Rehearse)
    assert types(ti_s.inputs[:4]) == ["MODEL", "CLIP", "VAE", images + ",PUBLIC_IMAGES"]
    assert types(ti_s.outputs) == ["EMBEDDING_SET"]
    assert ti_s.is_input_list  # accepts lists from ComfyUI's dataset loaders
    assert types(schemas["DpaggClipEmbeddings"].inputs[:2]) == ["CLIP_VISION", images]
    for node_id in ("DpaggPerImageTI", "DpaggClipEmbeddings"):  # to see the upstream loader
        assert {"PROMPT", "UNIQUE_ID"} <= set(schemas[node_id].hidden)
    assert types(schemas["DpaggPrivacyAccountant"].outputs) == ["DP_PLAN", "STRING"]
    agg = schemas["DpaggAggregate"]
    assert types(agg.inputs[:2]) == ["EMBEDDING_SET", "DP_PLAN"]
    optional = {i.id: i.get_io_type() for i in agg.inputs if i.optional}
    assert optional == {
        "basis": "PUBLIC_BASIS",
        "postprocess": "COMBO",
        "public_embeddings": "PUBLIC_EMBEDDINGS",
        "public_embeddings_file": "STRING",
    }
    assert types(schemas["DpaggLoadPublicImages"].outputs) == ["PUBLIC_IMAGES"]
    style = schemas["DpaggPublicStyle"]
    assert types(style.outputs) == ["PUBLIC_BASIS", "PUBLIC_EMBEDDINGS", "FLOAT"]
    rehearse = schemas["DpaggRehearse"]
    assert types(rehearse.inputs[:2]) == ["EMBEDDING_SET", "DP_PLAN"]
    assert [o.is_output_list for o in rehearse.outputs] == [True, True]
    pick = next(i for i in rehearse.inputs if i.id == "pick_seed")
    assert pick.control_after_generate is False
    (centre,) = [i for i in agg.inputs if i.id == "centre"]
    assert centre.options == ["initializer", "origin", "public_mean"]
    assert types(schemas["DpaggPublicBasis"].outputs) == ["PUBLIC_BASIS"]
    assert types(agg.outputs) == ["STRING", "CLIP_VISION_OUTPUT"]
    # The TI seed must not be randomised after each queue (a re-run would spend budget again).
    # (not named "seed": ComfyUI's frontend adds a randomize control to inputs named so)
    seed = next(i for i in ti_s.inputs if i.id == "training_seed")
    assert seed.control_after_generate is False
    assert not [i for i in ti_s.inputs if i.id in ("seed", "noise_seed")]


def test_paths_mean_the_same_file_in_nodes_cli_and_library(
    pack, comfy_base, tmp_path, monkeypatch, capsys
):
    """``~`` in DPAGG_LEDGER / DPAGG_DATA_DIR / any path argument: one file for the nodes, the CLI
    and the library (a literal ``~`` used to make one ledger per working directory)."""
    from dpagg_core import paths
    from dpagg_core.cli import build_parser

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("DPAGG_LEDGER", "~/dp/ledger.sqlite")
    monkeypatch.setenv("DPAGG_DATA_DIR", "~/dpdata")
    want = home / "dp" / "ledger.sqlite"
    assert pack["common"].ledger_path() == want == paths.default_ledger_path()
    assert paths.data_dir() == home / "dpdata"
    parser = build_parser()
    assert parser.parse_args(["ledger", "show", "--ledger", "~/dp/ledger.sqlite"]).ledger == want
    run = ["run", "--images", "~/imgs", "--model", "m.safetensors", "--epsilon", "1"]
    args = parser.parse_args(run + ["--name", "x", "--out-dir", "~/out"])
    assert (args.images, args.model, args.out_dir) == (
        home / "imgs",
        cwd / "m.safetensors",
        home / "out",
    )
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    aggregate(pack, eset, plan, budget_epsilon=2.0)  # the node's release
    assert want.is_file() and not (cwd / "~").exists()
    from dpagg_core.cli import main

    monkeypatch.delenv("DPAGG_LEDGER")
    assert main(["ledger", "show", "--json", "--ledger", "~/dp/ledger.sqlite"]) == 0
    shown = json.loads(capsys.readouterr().out)  # the CLI reads the file the node wrote
    assert shown["ledger"] == str(want) and len(shown["releases"]) == 1


@pytest.mark.parametrize(
    "name", ["private_style_embedding", "private_clip_style", "rehearse_on_public_images"]
)
def test_example_workflows_are_consistent(pack, name):
    wf = json.loads((REPO / "example_workflows" / f"{name}.json").read_text())
    assert wf["version"] == 0.4
    nodes = {n["id"]: n for n in wf["nodes"]}
    for lid, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == typ
        assert lid in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid
        assert typ in nodes[dst]["inputs"][dst_slot]["type"].split(",")
    ours = {c.define_schema().node_id: c for c in pack["nodes"].NODES}
    used = [n for n in wf["nodes"] if n["type"] in ours]
    kinds = {n["type"] for n in used}
    for n in used:  # widget values line up with the node's current schema
        assert len(n["widgets_values"]) == len(widget_ids(ours[n["type"]], pack["io"])), n["type"]
    # no loader whose id depends on file names
    assert not {n["type"] for n in wf["nodes"]} & pack["common"].UNSTABLE_LOADERS
    text = json.dumps(wf)
    assert "embedding_set" in text and "DP_PLAN" in text
    if name == "rehearse_on_public_images":  # public pictures only: nothing to spend
        assert kinds >= {"DpaggLoadPublicImages", "DpaggPublicStyle", "DpaggRehearse"}
        assert not kinds & {"DpaggLoadPrivateImages", "DpaggAggregate"}
        return
    assert kinds >= {"DpaggLoadPrivateImages", "DpaggPrivacyAccountant", "DpaggAggregate"}
    # the images come from Load Private Images
    loader = next(n for n in used if n["type"] == "DpaggLoadPrivateImages")
    (link,) = loader["outputs"][0]["links"]
    dst = next(x for x in wf["links"] if x[0] == link)[3]
    assert nodes[dst]["type"] in ("DpaggPerImageTI", "DpaggClipEmbeddings")
    if name == "private_style_embedding":  # the small-set recipe is the main template
        agg = next(n for n in used if n["type"] == "DpaggAggregate")
        linked = {i["name"]: i["link"] for i in agg["inputs"]}
        sources = {x[0]: nodes[x[1]]["type"] for x in wf["links"]}
        for socket in ("basis", "public_embeddings", "clip_norm"):
            assert sources[linked[socket]] == "DpaggPublicStyle", socket
        assert agg["widgets_values"][1] == "public_mean"


def test_frontend_extension_reads_the_ui_key(pack):
    js = (REPO / "js" / "dpagg.js").read_text()
    assert f"message?.{pack['common'].UI_KEY}?.[0]" in js
    for node_id in ("DpaggPrivacyAccountant", "DpaggAggregate"):
        assert f'"{node_id}"' in js


def test_frontend_extension_is_valid_javascript(pack):
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js `node` binary on PATH: the syntax check of js/dpagg.js needs it")
    mjs = Path(pack["common"].__file__).parent.parent / "js" / "dpagg.js"
    check = subprocess.run(
        [node, "--input-type=module", "--check"],
        input=mjs.read_text(),
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr


def test_ui_payload_numbers_are_public(pack, comfy_base):
    """The DP Aggregate message holds the plan, budget figures and names, nothing per image."""
    eset = ti_set(n=6)
    plan = calibration.calibrate(1.0, 1e-5, 6, "full")
    payload = aggregate(pack, eset, plan, budget_epsilon=2.0).ui["dpagg"][0]
    allowed = {
        "title",
        "lines",
        "warning",
        "name",
        "prompt",
        "reused",
        "plan",
        "budget",
        "spent",
        "remaining",
        "releases",
        "next_release_exceeds",
        "next_release_max_epsilon",  # what the next release can be (issue 20 item 4)
        "budget_lines",  # the budget part of lines, refreshed by js/dpagg.js (item 3)
        "budget_query",  # dataset id, plan, caps: public, sent back to the status route
        "own_warning",  # red for this node's own reason (kept when budget lines refresh)
        "forecast",  # SNR, verdict, K, rho, n, epsilon, needed n/epsilon: public (issue 21)
    }
    assert set(payload) == allowed
    assert set(payload["forecast"]) == {
        "snr",
        "verdict",
        "rho",
        "rho_source",
        "k",
        "n",
        "epsilon",
        "needed_n",
        "needed_epsilon",
    }
    assert set(payload["budget_query"]) == {"dataset", "plan", "targets", "refusals"}
    assert payload["lines"][-len(payload["budget_lines"]) :] == payload["budget_lines"]
    flat = np.concatenate([eset.flat().ravel()])
    text = json.dumps(payload)
    assert not any(f"{v:.6f}" in text for v in flat[:50])
