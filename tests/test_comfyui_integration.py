"""The node pack inside a real ComfyUI (skipped unless ``COMFYUI_DIR`` points at a checkout).

Setup (``.ci/comfyui`` does all of it in CI, from the vendored ComfyUI snapshot): a ComfyUI
checkout with its own venv (``COMFYUI_DIR/.venv``, or ``COMFYUI_PYTHON``) holding ComfyUI's
requirements plus this pack's ``requirements.txt``, and ``DPAGG_SD15_CKPT``: an SD1-layout
checkpoint ComfyUI's Load Checkpoint detects as SD1.5; optionally ``DPAGG_SD2V_CKPT`` and
``DPAGG_SDXL_CKPT`` (random weights are fine: ``tests/make_comfy_test_ckpts.py`` writes all
three). The tests start ``main.py --cpu`` on a free port with a
temporary ``--base-directory`` (models, custom_nodes/dpagg -> this repo, input, output, user),
queue API workflows through ``/prompt`` and inspect files, the ledger and ComfyUI's log.
Small on purpose (64 px, 2 TI steps, 2 images, 2 sampler steps): it runs on 2 CPU cores.

Identity (docs/privacy.md invariant 7): renamed / re-listed mixed-size files keep their dataset
id and
budget through Load Private Images; ComfyUI's own folder loader is refused; and the image kinds
whose decode used to differ (semi-transparent RGBA, 16-bit gray, palette, CMYK, EXIF-rotated
JPEG) get the same id through ComfyUI's Load Image as through the CLI's decode.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from image_kinds import COMFYUI_KINDS, KINDS, write_mixed_sizes

REPO = Path(__file__).resolve().parent.parent
COMFY = os.environ.get("COMFYUI_DIR")
CKPT = os.environ.get("DPAGG_SD15_CKPT")
# Random SD2 (v-prediction) and SDXL checkpoints from tests/make_comfy_test_ckpts.py (optional).
FAMILY_CKPTS = {
    "sd2v": os.environ.get("DPAGG_SD2V_CKPT"),
    "sdxl": os.environ.get("DPAGG_SDXL_CKPT"),
}
pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR to a ComfyUI checkout to run"),
]
OUR_NODES = (
    "DpaggLoadPrivateImages",
    "DpaggPerImageTI",
    "DpaggClipEmbeddings",
    "DpaggPrivacyAccountant",
    "DpaggAggregate",
    "DpaggPrivacyLedger",
    "DpaggPublicBasis",
    "DpaggLoadPublicImages",
    "DpaggPublicStyle",
    "DpaggRehearse",
)
PUBLIC_STYLES = "public_style_images"  # the main template's public folder (one subfolder per style)
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFY) / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPAGG_")}
    env["DPAGG_DATA_DIR"] = str(data_dir)  # install salt; the ledger stays ComfyUI's user dir
    env.pop("PYTHONPATH", None)
    return env


def write_public_styles(folder: Path, styles: int = 3, per_style: int = 3) -> None:
    """PUBLIC pictures in one subfolder per style (Public Style's k=auto holds one out)."""
    for s in range(styles):
        write_images(folder / f"style{s}", per_style, seed=100 + s)


def all_of_class(api: dict, cls: str) -> list[dict]:
    return [n["inputs"] for n in api.values() if n["class_type"] == cls]


def write_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = np.zeros((size, size, 3))
        base[..., i % 3] = 180
        img = (base + rng.integers(0, 70, (size, size, 3))).astype("uint8")
        Image.fromarray(img).save(folder / f"img{i}.png")


CLIP_VISION_SCRIPT = """
import json, sys, torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
cfg = json.load(open(sys.argv[1]))
torch.manual_seed(0)
m = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in cfg.items()
                                                       if k != "torch_dtype"}))
save_file({k: v.half().contiguous() for k, v in m.state_dict().items()}, sys.argv[2])
"""


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    if not CKPT or not Path(CKPT).is_file():
        pytest.skip("set DPAGG_SD15_CKPT to an SD1-layout .safetensors checkpoint")
    base = tmp_path_factory.mktemp("comfy_base")
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "sd15_test.safetensors").symlink_to(Path(CKPT).resolve())
    for i, (family, path) in enumerate(FAMILY_CKPTS.items()):
        if path and Path(path).is_file():
            link = base / "models" / "checkpoints" / f"{family}_test.safetensors"
            link.symlink_to(Path(path).resolve())
            write_images(base / "input" / f"dpagg_it_{family}", 2, seed=10 + i)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "dpagg").symlink_to(REPO)
    write_images(base / "input" / "dpagg_it_images", 2)
    write_public_styles(base / "input" / PUBLIC_STYLES)
    write_images(base / "input" / "dpagg_it_rehearsal", 4, seed=30)
    write_images(base / "input" / "dpagg_it_clip_images", 3, size=48)
    write_images(base / "input" / "dpagg_it_basis", 2, seed=7)
    write_images(base / "input" / "dpagg_it_rerun", 2, seed=8)
    write_images(base / "input" / "dpagg_it_cli", 2, seed=9)
    write_mixed_sizes(base / "input" / "dpagg_it_mixed")
    for kind in COMFYUI_KINDS:  # a folder per kind, and the same files in input/ for Load Image
        folder = base / "input" / f"dpagg_kind_{kind}"
        folder.mkdir()
        for i in range(2):
            path, _ = KINDS[kind](folder, f"{kind}{i}", 20 + i)
            shutil.copy(path, base / "input" / f"dpagg_kind_{kind}_{i}{path.suffix}")
    data = base / "dpagg_data"
    env = child_env(data)
    vision = base / "models" / "clip_vision" / "vitl_random.safetensors"
    vision.parent.mkdir(parents=True)
    cfg = Path(COMFY) / "comfy" / "clip_vision_config_vitl.json"
    subprocess.run(
        [comfy_python(), "-c", CLIP_VISION_SCRIPT, str(cfg), str(vision)],
        check=True,
        env=env,
        timeout=600,
    )
    yield from launch_comfy(base, env)


def launch_comfy(base: Path, env: dict[str, str]):
    """Start ``main.py --cpu`` on a free port with ``base`` as its base directory, wait for the
    pack's nodes, yield ``{"url", "base", "log", "startup_s"}``, stop it (shared by the browser
    test, ``tests/test_comfyui_browser.py``)."""
    port = free_port()
    log_path = base / "comfyui.log"
    log = open(log_path, "w")
    t0 = time.time()
    proc = subprocess.Popen(
        [comfy_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
        + ["--base-directory", str(base)],
        cwd=COMFY,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited: {log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/object_info/DpaggAggregate", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.time() - t0 > 600:
                    pytest.fail("ComfyUI did not start within 600 s")
                time.sleep(2)
        yield {"url": url, "base": base, "log": log_path, "startup_s": time.time() - t0}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def get(comfy, path):
    return json.load(urllib.request.urlopen(comfy["url"] + path, timeout=60))


def post(comfy, path, body):
    req = urllib.request.Request(
        comfy["url"] + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(req, timeout=60).read()


def queue(comfy, api: dict, timeout: float = 1200) -> dict:
    """POST /prompt and wait for the history entry: {status, errors, outputs, seconds}."""
    t0 = time.time()
    try:
        accepted = json.loads(post(comfy, "/prompt", {"prompt": api}))
    except urllib.error.HTTPError as e:
        return {"status": "rejected", "errors": [e.read().decode()], "outputs": {}}
    pid = accepted["prompt_id"]
    while time.time() - t0 < timeout:
        hist = get(comfy, f"/history/{pid}")
        if pid in hist:
            st = hist[pid]["status"]
            msgs = st.get("messages", [])
            errors = [m[1] for m in msgs if m[0] == "execution_error"]
            cached = [n for m in msgs if m[0] == "execution_cached" for n in m[1]["nodes"]]
            return {
                "status": st.get("status_str"),
                "errors": errors,
                "cached": cached,
                "outputs": hist[pid]["outputs"],
                "seconds": round(time.time() - t0, 1),
                # output nodes ComfyUI left out because they failed validation (others ran)
                "node_errors": accepted.get("node_errors") or {},
                "prompt_id": pid,
            }
        time.sleep(1)
    pytest.fail(f"prompt {pid} did not finish within {timeout} s")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """UI-format workflow -> API prompt, as the frontend's graphToPrompt does for plain graphs:
    widget values in schema order (skipping a seed's control_after_generate value), then links."""
    links = {link[0]: link for link in workflow["links"]}
    api = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) in (2, 4):
            continue
        info = object_info[node["type"]]
        spec = {**info["input"]["required"], **info["input"].get("optional", {})}
        order = info["input_order"]["required"] + info["input_order"].get("optional", [])
        values = list(node.get("widgets_values") or [])
        inputs, i = {}, 0
        for name in order:
            typ, opts = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
            widget = isinstance(typ, list) or typ in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
            if widget and not opts.get("forceInput") and i < len(values):
                inputs[name] = values[i]
                i += 1
                if opts.get("control_after_generate"):
                    i += 1
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


def by_class(api: dict, cls: str) -> dict:
    return next(n["inputs"] for n in api.values() if n["class_type"] == cls)


def small_style_api(
    comfy,
    name: str,
    budget: float = 3.0,
    folder: str = "dpagg_it_images",
    ckpt: str = "sd15_test.safetensors",
) -> dict:
    """The example workflow (the small-set recipe: Public Style from 3 x 3 PUBLIC pictures),
    made small: SD1 test checkpoint, 2 private images, 64 px, 2 steps."""
    wf = json.loads((REPO / "example_workflows" / "private_style_embedding.json").read_text())
    api = ui_to_api(wf, get(comfy, "/object_info"))
    by_class(api, "CheckpointLoaderSimple")["ckpt_name"] = ckpt
    by_class(api, "DpaggLoadPrivateImages").update(folder=folder, resolution=64)
    by_class(api, "DpaggLoadPublicImages").update(folder=PUBLIC_STYLES, resolution=64)
    for ti in all_of_class(api, "DpaggPerImageTI"):  # the private and the public one
        ti.update(steps=2, resolution=64, batch_size=2, training_seed=3)
    by_class(api, "DpaggPrivacyAccountant").update(epsilon=2.0, delta=1e-3)
    by_class(api, "DpaggAggregate").update(name=name, budget_epsilon=budget, budget_delta=0.0)
    by_class(api, "EmptyLatentImage").update(width=64, height=64)
    by_class(api, "KSampler").update(steps=2)
    return api


def ledger_file(comfy) -> Path:
    return comfy["base"] / "user" / "dpagg" / "ledger.sqlite"


def ledger_rows(comfy, columns: str = "id, name, epsilon") -> list:
    import sqlite3

    path = ledger_file(comfy)
    if not path.exists():
        return []
    with sqlite3.connect(path) as con:
        return con.execute(f"SELECT {columns} FROM releases ORDER BY id").fetchall()


def embedding_files(comfy) -> list[str]:
    folder = comfy["base"] / "models" / "embeddings"
    return sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []


# --------------------------------------------------------------------------------------------


def test_pack_loads_and_object_info_lists_the_nodes(comfy):
    log = comfy["log"].read_text()
    assert "custom_nodes/dpagg" in log  # listed under "Import times for custom nodes"
    assert "IMPORT FAILED" not in "\n".join(x for x in log.splitlines() if "dpagg" in x)
    assert "Cannot import" not in "\n".join(x for x in log.splitlines() if "dpagg" in x)
    info = get(comfy, "/object_info")
    for node in OUR_NODES:
        assert info[node]["category"] == "dpagg/privacy"
    assert info["DpaggPerImageTI"]["output"] == ["EMBEDDING_SET"]
    req = info["DpaggPerImageTI"]["input"]["required"]
    assert [req[k][0] for k in ("model", "clip", "vae", "images")] == [
        "MODEL",
        "CLIP",
        "VAE",
        "IMAGE,PRIVATE_IMAGES,PUBLIC_IMAGES",
    ]
    assert info["DpaggClipEmbeddings"]["input"]["required"]["clip_vision"][0] == "CLIP_VISION"
    assert info["DpaggLoadPrivateImages"]["output"] == ["PRIVATE_IMAGES"]
    folders = info["DpaggLoadPrivateImages"]["input"]["required"]["folder"]
    assert "dpagg_it_images" in json.dumps(folders)  # ComfyUI/input's sub-folders
    assert info["DpaggPrivacyAccountant"]["output"] == ["DP_PLAN", "STRING"]
    assert info["DpaggPrivacyAccountant"]["input"]["optional"]["embedding_set"][0] == (
        "EMBEDDING_SET"
    )
    assert info["DpaggAggregate"]["output"] == ["STRING", "CLIP_VISION_OUTPUT"]
    assert [info["DpaggAggregate"]["input"]["required"][k][0] for k in ("embedding_set", "plan")]
    # the frontend extension and the example workflows are served
    assert any("dpagg" in e and e.endswith("dpagg.js") for e in get(comfy, "/extensions"))
    templates = get(comfy, "/workflow_templates")
    assert sorted(templates["dpagg"]) == [
        "private_clip_style",
        "private_style_embedding",
        "rehearse_on_public_images",
    ]
    for name in templates["dpagg"]:  # the thumbnail the template browser asks for
        thumb = urllib.request.urlopen(f"{comfy['url']}/api/workflow_templates/dpagg/{name}.jpg")
        assert thumb.headers["Content-Type"] == "image/jpeg" and thumb.read(3) == b"\xff\xd8\xff"
    wf = get(comfy, "/api/workflow_templates/dpagg/private_style_embedding.json")
    assert ui_to_api(wf, info)["5"]["class_type"] == "DpaggAggregate"
    assert ui_to_api(wf, info)["2"]["class_type"] == "DpaggLoadPrivateImages"


def test_style_workflow_end_to_end_then_reuse_then_over_budget(comfy):
    """Example workflow 1 via /prompt: a release; an identical queue (ComfyUI's cache); after
    dropping ComfyUI's caches an over-budget queue (TI retrains, the release is refused, nothing
    spent, and Per-Image TI's deferred training never ran); and the first request again (DP
    Aggregate re-executes: the ledger returns the recorded release, nothing trained or spent, no
    new file)."""
    api = small_style_api(comfy, "itstyle")
    first = queue(comfy, api)
    assert first["status"] == "success", first["errors"]
    ui = first["outputs"]["5"]["dpagg"][0]
    assert ui["prompt"] == "embedding:itstyle" and ui["reused"] is False
    assert embedding_files(comfy) == ["itstyle.safetensors"]
    assert len(ledger_rows(comfy)) == 1
    assert first["outputs"]["12"]["images"], "SaveImage produced no image"
    from safetensors import safe_open

    with safe_open(comfy["base"] / "models" / "embeddings" / "itstyle.safetensors", "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        assert list(f.get_tensor("emb_params").shape) == [1, 768]
        meta = f.metadata()
    assert meta["n"] == "2" and meta["format"].startswith("dpagg-release")
    assert "dpagg_it_images" not in json.dumps(meta) and "/" not in meta["base_model_id"][:1]
    log = comfy["log"].read_text()
    assert "shape mismatch" not in log
    assert "embedding:itstyle does not exist" not in log
    print(f"\nfirst queue: {first['seconds']} s (startup {comfy['startup_s']:.0f} s)")

    second = queue(comfy, api)  # identical: ComfyUI serves its cache, the ledger is untouched
    assert second["status"] == "success", second["errors"]
    assert {"3", "5"} <= set(second["cached"])
    assert len(ledger_rows(comfy)) == 1 and embedding_files(comfy) == ["itstyle.safetensors"]

    # Drop ComfyUI's caches. The worker takes the /free flags when they wake it while idle, and
    # in any case right after the queue item it is running, before it starts the next: so once a
    # trivial prompt queued after /free has finished (polled, with a deadline), the caches are
    # gone before the next prompt starts. No fixed sleep.
    post(comfy, "/free", {"free_memory": True, "unload_models": True})
    empty = {"width": 8, "height": 8, "batch_size": 1, "color": 0}
    probe = {
        "901": {"class_type": "EmptyImage", "inputs": empty},
        "902": {"class_type": "PreviewImage", "inputs": {"images": ["901", 0]}},
    }
    assert queue(comfy, probe, timeout=120)["status"] == "success"
    over = small_style_api(comfy, "itstyle_more")  # a new release: 2 + 2 > budget 3
    trainings = comfy["log"].read_text().count("dpagg Per-Image TI: 100%")
    refused = queue(comfy, over)
    assert refused["status"] == "error"
    assert "3" not in refused["cached"]  # Per-Image TI re-ran (it hands on a deferred job)
    # refused before the deferred training ran
    assert comfy["log"].read_text().count("dpagg Per-Image TI: 100%") == trainings
    err = refused["errors"][0]
    assert err["node_type"] == "DpaggAggregate"
    assert "budget" in err["exception_message"] and "BudgetExceeded" in err["exception_type"]
    assert "nothing was spent" in err["exception_message"]
    # ComfyUI's install has no `dpagg` on PATH: the fix names the Privacy Ledger node and the
    # exact command with ComfyUI's own Python; the budget is used up, so no "smaller epsilon"
    assert "Privacy Ledger node" in err["exception_message"]
    assert "-m dpagg_core.cli ledger set-budget --ledger" in err["exception_message"]
    assert "`dpagg ledger" not in err["exception_message"]
    assert "smaller epsilon" not in err["exception_message"]
    assert len(ledger_rows(comfy)) == 1 and embedding_files(comfy) == ["itstyle.safetensors"]
    # the Privacy Accountant of the same queue gave DP Aggregate's verdict before it ran
    acc_ui = refused["outputs"][node_of(over, "DpaggPrivacyAccountant")]["dpagg"][0]
    assert acc_ui["will_be_refused"] is True and acc_ui["warning"] is True

    # The original request again: DP Aggregate re-executes, the ledger recognises the request
    # by its inputs and returns the recorded release; nothing trains.
    third = queue(comfy, api)
    assert third["status"] == "success", third["errors"]
    assert "5" not in third["cached"], third["cached"]
    ui3 = third["outputs"]["5"]["dpagg"][0]
    assert ui3["reused"] is True and ui3["prompt"] == "embedding:itstyle"
    assert ui3["trained"] is False
    assert comfy["log"].read_text().count("dpagg Per-Image TI: 100%") == trainings
    assert len(ledger_rows(comfy)) == 1 and embedding_files(comfy) == ["itstyle.safetensors"]
    print(f"refused queue (nothing trained): {refused['seconds']} s; re-run: {third['seconds']} s")

    # Per-Image TI reported its setup stages and a KSampler-like step line in the server log.
    log = comfy["log"].read_text()
    assert "[dpagg] Per-Image TI: preparing the model" in log
    assert "[dpagg] Per-Image TI: encoding latents (images 1-2 of 2)" in log
    assert "dpagg Per-Image TI: 100%" in log

    # The Privacy Ledger node (through /prompt) lists the set, its budget and the release.
    shown = queue(comfy, {"l": {"class_type": "DpaggPrivacyLedger", "inputs": LEDGER_SHOW}})
    assert shown["status"] == "success", shown["errors"]
    table = shown["outputs"]["l"]["dpagg"][0]["datasets"]
    ds = ui["dataset"] if "dataset" in ui else None
    sets = {t["dataset"]: t for t in table}
    assert any(r["files"] == ["itstyle"] for t in table for r in t["releases"]), table
    assert ds is None or sets[ds]["budget"]["epsilon"] == 3.0


TOKENIZERS = {  # family -> (ComfyUI tokenizer, {token key: width})
    "sd1": ("comfy.sd1_clip.SD1Tokenizer", {"l": 768}),
    "sd2v": ("comfy.text_encoders.sd2_clip.SD2Tokenizer", {"h": 1024}),
    "sdxl": ("comfy.sdxl_clip.SDXLTokenizer", {"l": 768, "g": 1280}),
}


def tokenize_release(folder: Path, name: str, family: str) -> None:
    """ComfyUI's own tokenizer for the family reads embedding:<name> from ``folder``: one vector
    of the encoder's width per encoder, and no log record about embeddings or shapes."""
    cls, widths = TOKENIZERS[family]
    module, _, attr = cls.rpartition(".")
    code = (
        "import importlib, logging, sys, torch\n"
        f"sys.path.insert(0, {COMFY!r})\n"
        "import comfy.options; comfy.options.enable_args_parsing(); sys.argv = ['t', '--cpu']\n"
        "records = []\n"
        "class H(logging.Handler):\n"
        "    def emit(self, r): records.append(r.getMessage())\n"
        "logging.getLogger().addHandler(H()); logging.getLogger().setLevel(logging.INFO)\n"
        f"Tok = getattr(importlib.import_module({module!r}), {attr!r})\n"
        f"tok = Tok(embedding_directory=[{str(folder)!r}])\n"
        f"out = tok.tokenize_with_weights('a lighthouse, in the style of embedding:{name}')\n"
        f"for key, width in {widths!r}.items():\n"
        "    embs = [t for t, w in out[key][0] if isinstance(t, torch.Tensor)]\n"
        "    assert len(embs) == 1 and tuple(embs[0].shape) == (width,), (key, embs)\n"
        "assert not [r for r in records if 'embedding' in r or 'mismatch' in r], records\n"
        "print('ok', sorted(out), len(next(iter(out.values()))[0]))\n"
    )
    res = subprocess.run(
        [comfy_python(), "-c", code], capture_output=True, text=True, cwd=COMFY, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] == "ok" and res.stdout.split()[-1] == "77", res.stdout


def test_comfyui_tokenizer_loads_the_release_without_warnings(comfy):
    folder = comfy["base"] / "models" / "embeddings"
    if not (folder / "itstyle.safetensors").exists():
        pytest.skip("needs the release of the end-to-end test")
    tokenize_release(folder, "itstyle", "sd1")


@pytest.mark.parametrize("family", ["sd2v", "sdxl"])
def test_per_image_ti_and_release_on_sd2v_and_sdxl(comfy, family):
    """The example workflow on a random SD2 v-prediction / SDXL checkpoint that ComfyUI detects
    as such (tests/make_comfy_test_ckpts.py): Per-Image TI trains through the v-prediction
    target / both SDXL encoders (pooled ``y``), DP Aggregate writes the file layout of the family
    (``emb_params`` [1, 1024]; ``clip_l`` [1, 768] + ``clip_g`` [1, 1280]), the prompt that
    uses it samples, and ComfyUI loads it with no shape warning."""
    ckpt = comfy["base"] / "models" / "checkpoints" / f"{family}_test.safetensors"
    if not ckpt.exists():
        pytest.skip(f"set DPAGG_{family.upper()}_CKPT (tests/make_comfy_test_ckpts.py)")
    name = f"it{family}"
    api = small_style_api(comfy, name, budget=10.0, folder=f"dpagg_it_{family}", ckpt=ckpt.name)
    res = queue(comfy, api)
    assert res["status"] == "success", res["errors"]
    ti = res["outputs"][node_of(api, "DpaggPerImageTI")]["dpagg"][0]
    want_pred = "v_prediction" if family == "sd2v" else "epsilon"
    assert ti["prediction"] == want_pred, ti
    assert res["outputs"][node_of(api, "DpaggAggregate")]["dpagg"][0]["prompt"] == (
        f"embedding:{name}"
    )
    assert res["outputs"][node_of(api, "SaveImage")]["images"]
    from safetensors import safe_open

    folder = comfy["base"] / "models" / "embeddings"
    with safe_open(folder / f"{name}.safetensors", "pt") as f:
        shapes = {k: list(f.get_tensor(k).shape) for k in f.keys()}
        meta = f.metadata()
    if family == "sdxl":
        assert shapes == {"clip_l": [1, 768], "clip_g": [1, 1280]}
        assert re.fullmatch(r"[0-9a-f]{16}", meta["base_model_id"])  # the CLI's id
    else:
        assert shapes == {"emb_params": [1, 1024]}
        assert re.fullmatch(r"[0-9a-f]{16}", meta["base_model_id"])
    log = comfy["log"].read_text()
    assert "shape mismatch" not in log and f"embedding:{name} does not exist" not in log
    tokenize_release(folder, name, family)
    print(f"\n{family}: {res['seconds']} s")


def test_public_basis_from_the_loaded_checkpoint_drives_dp_aggregate(comfy):
    """Public Basis (token_table) on Load Checkpoint's MODEL/CLIP names the model exactly as
    Per-Image TI does (else DP Aggregate would refuse it), and DP Aggregate releases in its
    subspace with James-Stein post-processing; the record names basis and post-processing."""
    api = small_style_api(comfy, "itbasis", budget=10.0, folder="dpagg_it_basis")
    ckpt = node_of(api, "CheckpointLoaderSimple")
    api["900"] = {
        "class_type": "DpaggPublicBasis",
        "inputs": {
            "source": "token_table",
            "k": 4,
            "vectors": by_class(api, "DpaggPerImageTI")["vectors"],
            "basis_file": "",
            "model": [ckpt, 0],
            "clip": [ckpt, 1],
        },
    }
    by_class(api, "DpaggAggregate").update(basis=["900", 0], postprocess="js")
    res = queue(comfy, api)
    assert res["status"] == "success", res["errors"]
    from safetensors import safe_open

    with safe_open(comfy["base"] / "models" / "embeddings" / "itbasis.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["basis_kind"] == "token_table" and meta["basis_k"] == "4"
    assert re.fullmatch(r"[0-9a-f]{16}", meta["base_model_id"])
    assert meta["postprocess"] == "js" and len(meta["basis_sha256"]) == 64
    print(f"\npublic basis release: {res['seconds']} s")


def drop_caches(comfy) -> None:
    """Drop ComfyUI's caches (models and node outputs): /free, then a trivial prompt, after
    which the worker has taken the flags (see the end-to-end test)."""
    post(comfy, "/free", {"free_memory": True, "unload_models": True})
    empty = {"width": 8, "height": 8, "batch_size": 1, "color": 0}
    probe = {
        "901": {"class_type": "EmptyImage", "inputs": empty},
        "902": {"class_type": "PreviewImage", "inputs": {"images": ["901", 0]}},
    }
    assert queue(comfy, probe, timeout=120)["status"] == "success"


def test_rerun_after_a_cache_drop_is_answered_from_the_ledger_without_training(comfy):
    """Issue 19 item 2: the template queued twice with ComfyUI's caches dropped in between.
    Every node executes again, but Per-Image TI only hands DP Aggregate a deferred training job
    and DP Aggregate finds the identical request (same images, model as patched, TI config and
    seed, plan, C, centre, name) in the ledger: the recorded release, nothing trained (no
    training line in the log), nothing spent."""
    api = small_style_api(comfy, "itrerun", budget=10.0, folder="dpagg_it_rerun")
    ti_node, agg = node_of(api, "DpaggPerImageTI"), node_of(api, "DpaggAggregate")
    first = queue(comfy, api)
    assert first["status"] == "success", first["errors"]
    ui = first["outputs"][agg]["dpagg"][0]
    assert ui["reused"] is False and ui["trained"] is True
    trainings = comfy["log"].read_text().count("dpagg Per-Image TI: 100%")
    assert trainings >= 1
    rows = ledger_rows(comfy)
    drop_caches(comfy)
    second = queue(comfy, api)
    assert second["status"] == "success", second["errors"]
    assert ti_node not in second["cached"] and agg not in second["cached"], second["cached"]
    ui2 = second["outputs"][agg]["dpagg"][0]
    assert ui2["reused"] is True and ui2["trained"] is False
    assert ui2["prompt"] == "embedding:itrerun"
    assert any("nothing trained, nothing spent" in line for line in ui2["lines"])
    log = comfy["log"].read_text()
    assert log.count("dpagg Per-Image TI: 100%") == trainings  # no training line added
    assert "DP Aggregate: answered from the ledger's record" in log
    assert ledger_rows(comfy) == rows
    print(f"\nfirst queue (trains): {first['seconds']} s; after a drop: {second['seconds']} s")


def test_cli_public_files_fit_dp_aggregate_in_comfyui(comfy, tmp_path):
    """Issue 19 item 5: one model id. `dpagg public-basis` (the CLI, this repo's Python) on the
    single-file checkpoint ComfyUI loads, with the ComfyUI pack's ledger, writes a public basis
    and public embeddings; DP Aggregate in ComfyUI, on sets trained from the same checkpoint,
    accepts both (centre=public_mean, Public Basis from the file) and the release names the
    CLI's model id."""
    pub = tmp_path / "public"
    write_images(pub, 2, seed=21)
    basis, emb = tmp_path / "basis.safetensors", tmp_path / "public_emb.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPAGG_")}
    env["DPAGG_DATA_DIR"] = str(tmp_path / "data")
    cmd = [sys.executable, "-m", "dpagg_core.cli", "public-basis", "--kind", "public_embeddings"]
    cmd += ["--model", str(CKPT), "--public-images", str(pub), "--ledger", str(ledger_file(comfy))]
    cmd += ["--save-public-embeddings", str(emb), "--out", str(basis), "--k", "1"]
    cmd += ["--steps", "2", "--resolution", "64", "--batch-size", "2", "--device", "cpu"]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    cli_s = time.time() - t0
    from safetensors import safe_open

    with safe_open(emb, "pt") as f:
        cli_id = f.metadata()["base_model_id"]
    assert re.fullmatch(r"[0-9a-f]{16}", cli_id)

    api = small_style_api(comfy, "itcli", budget=10.0, folder="dpagg_it_cli")
    api["910"] = {
        "class_type": "DpaggPublicBasis",
        "inputs": {"source": "file", "k": 1, "vectors": 1, "basis_file": str(basis)},
    }
    agg = by_class(api, "DpaggAggregate")
    agg.pop("public_embeddings")  # the CLI's file instead of the template's Public Style
    agg.update(
        centre="public_mean", public_embeddings_file=str(emb), basis=["910", 0], clip_norm=0.5
    )
    out = queue(comfy, api)
    assert out["status"] == "success", out["errors"]
    with safe_open(comfy["base"] / "models" / "embeddings" / "itcli.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["base_model_id"] == cli_id
    assert meta["centre"] == "public_mean" and meta["basis_kind"] == "public_embeddings"
    print(f"\nCLI public-basis: {cli_s:.0f} s; ComfyUI release with its files: {out['seconds']} s")


def test_main_template_releases_with_public_style_and_rehearsal_spends_nothing(comfy):
    """Issue 21 items 1 and 3 in the real ComfyUI. The main template's small-set recipe: Public
    Style (3 PUBLIC styles, k chosen by leaving one out) gives DP Aggregate its basis, the
    public-mean centre and C through links; the release records them and shows the forecast
    with rho from the public styles. The rehearsal template: Rehearse's list output renders
    one picture per grid cell through one KSampler -> Preview Image (2 + 3 epsilons x 2
    draws = 8), its files load as embeddings (no warning), the ledger is untouched."""
    api = small_style_api(comfy, "itrecipe", budget=10.0, folder="dpagg_it_basis")
    style, agg = node_of(api, "DpaggPublicStyle"), node_of(api, "DpaggAggregate")
    res = queue(comfy, api)
    assert res["status"] == "success", res["errors"]
    shown = res["outputs"][style]["dpagg"][0]
    assert any("chosen on 3 PUBLIC styles" in line for line in shown["lines"]), shown
    ui = res["outputs"][agg]["dpagg"][0]
    assert ui["forecast"]["rho_source"] == "measured on Public Style's images"
    assert ui["forecast"]["k"] == shown["K"]
    from safetensors import safe_open

    with safe_open(comfy["base"] / "models" / "embeddings" / "itrecipe.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["centre"] == "public_mean" and meta["basis_kind"] == "public_embeddings"
    assert float(meta["clip_norm"]) == pytest.approx(shown["clip_norm"], rel=1e-6)
    rows = ledger_rows(comfy)

    wf = json.loads((REPO / "example_workflows" / "rehearse_on_public_images.json").read_text())
    rehearsal = ui_to_api(wf, get(comfy, "/object_info"))
    by_class(rehearsal, "CheckpointLoaderSimple")["ckpt_name"] = "sd15_test.safetensors"
    loaders = {n["folder"]: n for n in all_of_class(rehearsal, "DpaggLoadPublicImages")}
    loaders["public_style_images"].update(resolution=64)
    loaders["public_rehearsal_images"].update(folder="dpagg_it_rehearsal", resolution=64)
    for ti in all_of_class(rehearsal, "DpaggPerImageTI"):
        ti.update(steps=2, resolution=64, batch_size=2, training_seed=3)
    by_class(rehearsal, "DpaggPrivacyAccountant").update(n=3, epsilon=2.0, delta=1e-3)
    by_class(rehearsal, "DpaggRehearse").update(name="itrehearsal")
    by_class(rehearsal, "EmptyLatentImage").update(width=64, height=64)
    by_class(rehearsal, "KSampler").update(steps=2)
    out = queue(comfy, rehearsal)
    assert out["status"] == "success", out["errors"]
    info = out["outputs"][node_of(rehearsal, "DpaggRehearse")]["dpagg"][0]
    assert info["rehearsal"]["n"] == 3 and info["rehearsal"]["available"] == 4
    assert len(info["labels"]) == 8 and info["labels"][1] == "non-private mean"
    assert len(out["outputs"][node_of(rehearsal, "PreviewImage")]["images"]) == 8
    files = sorted((comfy["base"] / "models" / "embeddings" / "dpagg_rehearsal").rglob("*"))
    assert len([f for f in files if f.suffix == ".safetensors"]) == 7
    log = comfy["log"].read_text()
    assert "does not exist, ignoring" not in log
    assert ledger_rows(comfy) == rows  # nothing recorded
    print(f"\nrecipe release: {res['seconds']} s; rehearsal (8 pictures): {out['seconds']} s")


def test_clip_workflow_end_to_end(comfy):
    """Example workflow 2 on a random ViT-L CLIP vision model; the SD1 checkpoint stands in for
    the unCLIP one (unCLIP Conditioning accepts the CLIP_VISION_OUTPUT; SD1 ignores it). The
    images of the style test are refused (their budget is shared with the TI release)."""
    wf = json.loads((REPO / "example_workflows" / "private_clip_style.json").read_text())
    api = ui_to_api(wf, get(comfy, "/object_info"))
    loader = next(k for k, n in api.items() if n["class_type"] == "unCLIPCheckpointLoader")
    api[loader] = {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "sd15_test.safetensors"},
    }
    api["100"] = {
        "class_type": "CLIPVisionLoader",
        "inputs": {"clip_name": "vitl_random.safetensors"},
    }
    by_class(api, "DpaggClipEmbeddings")["clip_vision"] = ["100", 0]
    by_class(api, "DpaggPrivacyAccountant").update(epsilon=2.0, delta=1e-5)
    by_class(api, "DpaggAggregate").update(name="itclip", budget_epsilon=0.0)
    by_class(api, "EmptyLatentImage").update(width=64, height=64)
    by_class(api, "KSampler").update(steps=2)
    folder = by_class(api, "DpaggLoadPrivateImages")
    if ledger_rows(comfy):  # the style test spent 2 of 3 on dpagg_it_images: the budget is
        folder.update(folder="dpagg_it_images")  # per image set, shared by TI and CLIP releases
        shared = queue(comfy, api)
        assert shared["status"] == "error"
        assert "BudgetExceeded" in shared["errors"][0]["exception_type"]
    folder.update(folder="dpagg_it_clip_images")  # another image set: its own budget
    rows = len(ledger_rows(comfy))
    # issue 20 item 10: its first release needs a deliberate budget; nothing spent without
    refused = queue(comfy, api)
    assert refused["status"] == "error" and len(ledger_rows(comfy)) == rows
    assert "budget_epsilon (on this node): choose the total epsilon" in str(refused["errors"])
    by_class(api, "DpaggAggregate").update(budget_epsilon=4.0)
    res = queue(comfy, api)
    assert res["status"] == "success", res["errors"]
    assert len(ledger_rows(comfy)) == rows + 1
    agg = next(k for k, n in api.items() if n["class_type"] == "DpaggAggregate")
    ui = res["outputs"][agg]["dpagg"][0]
    assert ui["prompt"] == "itclip" and ui["reused"] is False
    path = comfy["base"] / "output" / "dpagg_clip" / "itclip.safetensors"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        assert list(f.keys()) == ["image_embeds"]
        assert list(f.get_tensor("image_embeds").shape) == [1, 768]
        assert f.metadata()["clip_mode"] == "normalize"
    print(f"\nclip workflow: {res['seconds']} s")


LEDGER_SHOW = {"action": "show", "dataset": ""}


def node_of(api: dict, cls: str) -> str:
    return next(k for k, n in api.items() if n["class_type"] == cls)


def rename_all(folder: Path) -> None:
    """New names whose sorted order is the reverse of the old one (another first file)."""
    paths = sorted(folder.iterdir())
    for i, p in enumerate(paths):
        p.rename(folder / f"z{len(paths) - i:02d}_{p.stem}{p.suffix}")


ACCOUNTANT = {
    "mode": "target epsilon -> noise",
    "epsilon": 2.0,
    "noise_multiplier": 1.0,
    "delta": 1e-5,
    "n": 2,
    "sampling": "full",
    "m": 2,
    "q": 0.5,
    "releases": 1,
}


def add_id_chain(api: dict, tag: str, source: str) -> str:
    """``source`` (IMAGE or PRIVATE_IMAGES) -> Clip Embeddings (random ViT-L; its UI reports the
    dataset id) -> Privacy Accountant -> Preview Any of the PUBLIC plan summary (an output node,
    so the chain runs). Returns the Clip Embeddings node id."""
    api.setdefault(
        "cv", {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "vitl_random.safetensors"}}
    )
    api[f"{tag}_clip"] = {
        "class_type": "DpaggClipEmbeddings",
        "inputs": {"clip_vision": ["cv", 0], "images": [source, 0], "crop": "center"},
    }
    api[f"{tag}_acc"] = {
        "class_type": "DpaggPrivacyAccountant",
        "inputs": {**ACCOUNTANT, "embedding_set": [f"{tag}_clip", 0]},
    }
    api[f"{tag}_show"] = {"class_type": "PreviewAny", "inputs": {"source": [f"{tag}_acc", 1]}}
    return f"{tag}_clip"


def test_renamed_mixed_size_files_keep_their_id_and_budget(comfy):
    """Mixed-size pictures released once through the example workflow; then renamed (another
    file lists first) and re-listed into another folder under other names, loaded at another
    resolution: the same dataset id, so the second release is charged to the same budget and
    refused. ComfyUI's own folder loader (which resized every picture to the first file of an
    unsorted listing: a rename gave a new id, a fresh budget) is refused before training."""
    from dpagg_core.io.images import load_image_folder

    t0 = time.time()
    folder = comfy["base"] / "input" / "dpagg_it_mixed"
    api = small_style_api(comfy, "itmixed", budget=2.4, folder="dpagg_it_mixed")
    first = queue(comfy, api)
    assert first["status"] == "success", first["errors"]
    loader = node_of(api, "DpaggLoadPrivateImages")
    ds = first["outputs"][loader]["dpagg"][0]["dataset"]
    assert first["outputs"][node_of(api, "DpaggPerImageTI")]["dpagg"][0]["dataset"] == ds
    assert ledger_rows(comfy, "dataset_id, name")[-1] == (ds, "itmixed")
    # the CLI's decode of the same files, keyed by this ledger: the same id
    assert load_image_folder(folder, 64, ledger=ledger_file(comfy)).dataset_id == ds

    rename_all(folder)  # same folder: ComfyUI re-runs the loader (fingerprint), same id
    probe = {
        "load": {
            "class_type": "DpaggLoadPrivateImages",
            "inputs": {"folder": "dpagg_it_mixed", "resolution": 64},
        }
    }
    clip = add_id_chain(probe, "renamed", "load")
    seen = queue(comfy, probe)
    assert seen["status"] == "success", seen["errors"]
    assert "load" not in seen["cached"]
    assert seen["outputs"][clip]["dpagg"][0]["dataset"] == ds
    copy = comfy["base"] / "input" / "dpagg_it_mixed_copy"
    copy.mkdir()
    for i, p in enumerate(sorted(folder.iterdir(), reverse=True)):
        shutil.copy(p, copy / f"copy{i}_{p.name}")
    rows = len(ledger_rows(comfy))
    api2 = small_style_api(comfy, "itmixed_renamed", budget=2.4, folder="dpagg_it_mixed_copy")
    by_class(api2, "DpaggLoadPrivateImages").update(resolution=96)  # TI still trains at 64
    again = queue(comfy, api2)
    assert again["status"] == "error"
    err = again["errors"][0]
    assert err["node_type"] == "DpaggAggregate", err
    assert (
        "BudgetExceeded" in err["exception_type"]
        and "nothing was spent" in (err["exception_message"])
    )
    assert len(ledger_rows(comfy)) == rows
    ui = again["outputs"][node_of(api2, "DpaggLoadPrivateImages")]["dpagg"][0]
    assert ui["dataset"] == ds and ui["spent"]["epsilon"] > 0  # the first release's budget

    old = small_style_api(comfy, "itmixed_old", budget=2.4, folder="dpagg_it_mixed")
    old[node_of(old, "DpaggLoadPrivateImages")] = {
        "class_type": "LoadImageSetFromFolderNode",
        "inputs": {"folder": "dpagg_it_mixed", "resize_method": "Stretch"},
    }
    refused = queue(comfy, old)
    assert refused["status"] == "error"
    err = refused["errors"][0]
    assert err["node_type"] == "DpaggPerImageTI", err
    assert "Load Private Images" in err["exception_message"]
    assert len(ledger_rows(comfy)) == rows
    print(f"\nrename test: {time.time() - t0:.0f} s (first {first['seconds']} s)")


def test_image_kinds_same_id_through_load_image_and_the_cli_decode(comfy):
    """Two files of each kind - semi-transparent RGBA, 16-bit gray, palette with transparency,
    CMYK JPEG, EXIF-rotated JPEG - through ComfyUI's Load Image (+ Image Batch) into Clip
    Embeddings, and through Load Private Images: the dataset ids the nodes report equal the id
    of the CLI's decode of the same files (dpagg_core.io.images, this process) under the same
    ledger. One queue; Preview Any on the accountant's public summary makes it run."""
    from dpagg_core.io.images import load_image_folder

    api: dict = {}
    for kind in COMFYUI_KINDS:
        ext = next((comfy["base"] / "input" / f"dpagg_kind_{kind}").iterdir()).suffix
        for i in range(2):
            api[f"{kind}_{i}"] = {
                "class_type": "LoadImage",
                "inputs": {"image": f"dpagg_kind_{kind}_{i}{ext}"},
            }
        api[f"{kind}_batch"] = {
            "class_type": "ImageBatch",
            "inputs": {"image1": [f"{kind}_0", 0], "image2": [f"{kind}_1", 0]},
        }
        api[f"{kind}_load"] = {
            "class_type": "DpaggLoadPrivateImages",
            "inputs": {"folder": f"dpagg_kind_{kind}", "resolution": 64},
        }
        add_id_chain(api, f"{kind}_li", f"{kind}_batch")
        add_id_chain(api, f"{kind}_pi", f"{kind}_load")
    res = queue(comfy, api)
    assert res["status"] == "success", res["errors"]
    for kind in COMFYUI_KINDS:
        via_load_image = res["outputs"][f"{kind}_li_clip"]["dpagg"][0]["dataset"]
        via_loader = res["outputs"][f"{kind}_pi_clip"]["dpagg"][0]["dataset"]
        folder = comfy["base"] / "input" / f"dpagg_kind_{kind}"
        cli = load_image_folder(folder, 64, ledger=ledger_file(comfy)).dataset_id
        assert via_load_image == cli == via_loader, kind
    print(f"\nimage kinds: {res['seconds']} s for {len(COMFYUI_KINDS)} kinds x 2 loaders")


# ------------------------------------------------ raising a budget is never part of the graph
# DESIGN.md invariant 10: a workflow (computed or saved) never raises a budget; the person at the
# machine does, through the Privacy Ledger's "Raise budget..." dialog (a route on ComfyUI's own
# server, behind its middleware) or the CLI. Each test uses its own image-set id, given a budget
# of 1 here as `dpagg ledger set-budget` would.

RAISE_ROUTE = "/api/dpagg/ledger/budget"
# the Privacy Ledger's inputs before raising left the graph: what older saved workflows carry
OLD_LEDGER_SHOW = {**LEDGER_SHOW, "new_budget_epsilon": 0.0, "new_budget_delta": 0.0, "confirm": ""}


def ledger_with_budget(comfy, dataset: str, epsilon: float = 1.0):
    from dpagg_core.privacy.ledger import Ledger

    book = Ledger(ledger_file(comfy))
    book.set_budget(dataset, epsilon, 1e-5)
    return book


def budget_of(book, dataset: str) -> float:
    return book.status(dataset)["budget"]["epsilon"]


def raise_request(comfy, body, content_type="application/json", path=RAISE_ROUTE, headers=None):
    """POST to the raise route as the dialog does: (HTTP status, JSON reply or text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        comfy["url"] + path,
        data=data,
        headers={"Content-Type": content_type, **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def test_raise_graph_of_comfyui_string_nodes_cannot_raise_a_budget(comfy):
    """The shared-workflow attack: Ledger(show) -> ComfyUI's RegexExtract (the dataset id) ->
    StringConcatenate x2 ('raise <id> to 1000') -> a second Ledger node set to 'raise budget'.
    It used to raise the budget from 1 to 1000 with nothing typed; now that node is refused
    before it runs (the show node still runs: the old workflow loads) and the budget stays 1."""
    ds = "ds-itgraph00000000000000000000000"
    book = ledger_with_budget(comfy, ds)
    regex = {
        "string": ["1", 0],
        "regex_pattern": r"(ds-\w+): spent",
        "mode": "First Group",
        "case_insensitive": False,
        "multiline": False,
        "dotall": False,
        "group_index": 1,
    }
    api = {
        "1": {"class_type": "DpaggPrivacyLedger", "inputs": {**OLD_LEDGER_SHOW, "dataset": ds}},
        "2": {"class_type": "RegexExtract", "inputs": regex},
        "3": {
            "class_type": "StringConcatenate",
            "inputs": {"string_a": "raise ", "string_b": ["2", 0], "delimiter": ""},
        },
        "4": {
            "class_type": "StringConcatenate",
            "inputs": {"string_a": ["3", 0], "string_b": " to 1000", "delimiter": ""},
        },
        "5": {
            "class_type": "DpaggPrivacyLedger",
            "inputs": {
                "action": "raise budget",
                "dataset": ["2", 0],
                "new_budget_epsilon": 1000.0,
                "new_budget_delta": 0.0,
                "confirm": ["4", 0],
            },
        },
    }
    res = queue(comfy, api)
    assert budget_of(book, ds) == 1.0, res
    assert "5" not in res["outputs"], res["outputs"].get("5")
    refused = json.dumps(res["node_errors"].get("5") or res["errors"])
    assert "action 'raise budget' is refused" in refused, res
    assert "Raise budget..." in refused and "ledger set-budget" in refused
    # the show node of the same (old-format) workflow ran and shows budget 1
    assert res["status"] == "success", res["errors"]
    assert res["outputs"]["1"]["dpagg"][0]["datasets"][0]["budget"]["epsilon"] == 1.0
    # the raise node alone: the whole prompt is refused, nothing runs
    alone = queue(comfy, {"5": {**api["5"], "inputs": {**api["5"]["inputs"], "dataset": ds}}})
    assert alone["status"] == "rejected" and "is refused" in alone["errors"][0]
    assert budget_of(book, ds) == 1.0


def test_raise_route_raises_only_for_confirmed_json_behind_comfyuis_middleware(comfy):
    """The "Raise budget..." dialog's route on ComfyUI's own server: JSON with the typed
    confirmation raises the budget; another content type, a wrong confirmation, or a request
    from another origin (ComfyUI's origin check, as for /prompt) changes nothing."""
    ds = "ds-itroute0000000000000000000000000"
    book = ledger_with_budget(comfy, ds)
    good = {"dataset": ds, "epsilon": 5, "delta": 0, "confirm": f"raise {ds} to 5"}
    t0 = time.time()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        status, reply = raise_request(comfy, good, ctype)
        assert status == 415 and reply["ok"] is False, (ctype, reply)
    for confirm in ("", "yes", f"raise {ds} to 50", f"raise {ds} to 1000", "raise ds-x to 5"):
        status, reply = raise_request(comfy, {**good, "confirm": confirm})
        assert status == 400 and f"type exactly 'raise {ds} to 5'" in reply["error"], reply
    status, _ = raise_request(comfy, good, headers={"Origin": "http://evil.example"})
    assert status == 403
    prompt = post_status(comfy, "/prompt", {"prompt": {}}, {"Origin": "http://evil.example"})
    assert prompt == 403  # the same middleware refuses ComfyUI's own API the same way
    get_req = urllib.request.Request(comfy["url"] + RAISE_ROUTE, method="GET")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(get_req, timeout=60)
    assert err.value.code in (404, 405)  # no GET (aiohttp's static fallback answers 404)
    assert budget_of(book, ds) == 1.0

    status, reply = raise_request(comfy, good)
    assert status == 200 and reply["ok"] is True, reply
    assert reply["lines"][0] == f"budget of {ds}: 1 -> 5 (delta 1e-05)"
    assert budget_of(book, ds) == 5.0
    # ComfyUI serves custom routes with and without /api; the same-origin header is fine
    origin = {"Origin": comfy["url"]}
    again = {**good, "epsilon": 6, "confirm": f"raise {ds} to 6"}
    status, reply = raise_request(comfy, again, path="/dpagg/ledger/budget", headers=origin)
    assert status == 200 and budget_of(book, ds) == 6.0, reply
    # never below what is spent, never an unknown set
    status, reply = raise_request(
        comfy, {**good, "dataset": "ds-nope", "confirm": "raise ds-nope to 5"}
    )
    assert status == 404 and reply["ok"] is False
    assert "[dpagg] Privacy Ledger: budget of " + ds + ": 1 -> 5" in comfy["log"].read_text()
    print(f"\nraise route: {time.time() - t0:.2f} s for all requests")


def post_status(comfy, path, body, headers) -> int:
    req = urllib.request.Request(
        comfy["url"] + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_workflow_saved_after_a_raise_cannot_raise_when_queued_again(comfy):
    """After a raise through the dialog's route, the workflow as the frontend saves it holds
    only the node's widgets (action 'show', dataset): no epsilon, no confirmation, so queueing
    it again changes nothing and its prompt (what a PNG's metadata keeps) holds no confirmation.
    An older saved workflow that carries 'raise budget' and a matching confirmation, as a UI
    workflow or as a PNG's API prompt, is refused; the budget stays what the person set."""
    ds = "ds-itsavedwf000000000000000000000000"
    book = ledger_with_budget(comfy, ds)
    status, reply = raise_request(
        comfy, {"dataset": ds, "epsilon": 5, "delta": 0, "confirm": f"raise {ds} to 5"}
    )
    assert status == 200, reply
    info = get(comfy, "/object_info")
    node = info["DpaggPrivacyLedger"]["input"]
    order = info["DpaggPrivacyLedger"]["input_order"]
    assert order["required"] == ["action", "dataset"] and not order.get("optional")
    action = node["required"]["action"]
    assert (action[1]["options"] if action[0] == "COMBO" else action[0]) == ["show"]

    saved = {  # the frontend's save: one value per serialized widget (the button is not one)
        "nodes": [
            {"id": 1, "type": "DpaggPrivacyLedger", "inputs": [], "widgets_values": ["show", ds]}
        ],
        "links": [],
    }
    api = ui_to_api(saved, info)
    res = queue(comfy, api)
    assert res["status"] == "success", res["errors"]
    assert budget_of(book, ds) == 5.0
    assert res["outputs"]["1"]["dpagg"][0]["datasets"][0]["budget"]["epsilon"] == 5.0
    pid = res["prompt_id"]
    kept = json.dumps(get(comfy, f"/history/{pid}")[pid]["prompt"])
    assert ds in kept and "raise" not in kept and "confirm" not in kept and "1000" not in kept

    # Workflows saved before raising left the graph: the UI file (5 widget values) and the API
    # prompt a PNG holds; their confirmation matches a raise to 1000.
    old_values = ["raise budget", ds, 1000.0, 0.0, f"raise {ds} to 1000"]
    old_ui = {**saved, "nodes": [{**saved["nodes"][0], "widgets_values": old_values}]}
    old_api = {
        "1": {
            "class_type": "DpaggPrivacyLedger",
            "inputs": {
                "action": "raise budget",
                "dataset": ds,
                "new_budget_epsilon": 1000.0,
                "new_budget_delta": 0.0,
                "confirm": f"raise {ds} to 1000",
            },
        }
    }
    for prompt in (ui_to_api(old_ui, info), old_api):
        res = queue(comfy, prompt)
        assert res["status"] == "rejected", res
        assert "action 'raise budget' is refused" in res["errors"][0]
        assert "Raise budget..." in res["errors"][0]
        assert budget_of(book, ds) == 5.0


def test_backend_leaves_comfyui_models_as_they_were(tmp_path):
    """Per-Image TI on real ComfyUI objects: trains, keeps images independent, and leaves the
    originals exactly as they were (weights, patchers, module attributes, outputs)."""
    if not CKPT or not Path(CKPT).is_file():
        pytest.skip("set DPAGG_SD15_CKPT to an SD1-layout .safetensors checkpoint")
    out = tmp_path / "probe.json"
    res = subprocess.run(
        [comfy_python(), str(REPO / "tests" / "comfyui_backend_probe.py"), COMFY, CKPT, str(out)],
        capture_output=True,
        text=True,
        cwd=COMFY,
        env=child_env(tmp_path / "data"),
        timeout=3000,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r = json.loads(out.read_text())
    print("\nprobe:", json.dumps(r["timings"]))
    assert r["n"] == 2 and r["shape"] == [2, 1, 768] and r["model_family"] == "sd1"
    assert re.fullmatch(r"[0-9a-f]{16}", r["base_model_id"])  # the CLI's id of this file
    assert all(d > 0 for d in r["moved_from_init"]) and r["rows_distinct"]
    # invariant 1: image 0's embedding is the same trained alone or in a batch (float noise)
    assert r["row0_batch_vs_alone_maxabs"] < 1e-3
    assert r["state_keys_checked"] > 1000 and r["state_changed"] == []
    assert r["weights_checked"] > 500 and r["weights_changed"] == []
    assert r["cond_equal"] and r["denoised_equal"]
    assert r["model_key_same_on_clone"] and r["model_key_changed_by_patch"]
    assert r["model_key_changed_by_clip_skip"]
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
