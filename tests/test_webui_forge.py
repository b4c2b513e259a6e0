"""The WebUI extension inside a real Stable Diffusion WebUI Forge (skipped unless ``FORGE_DIR``).

Setup (not needed in CI): ``FORGE_DIR`` = a Forge checkout with its own ``.venv`` and an SD1.5
checkpoint in ``models/Stable-diffusion/`` (random weights are fine): ``shared/tools/forge-env.sh``
with ``FORGE_TEST_CKPT=1`` builds exactly that offline. The test copies this repository into
``<data dir>/extensions/dpagg`` as a clone would be, runs its ``install.py`` with Forge's own
installer helper, starts Forge headless on CPU (``--data-dir`` a temporary folder, the
checkpoints of ``FORGE_DIR``, ``--api --api-auth``), and drives the extension through its
``/dpagg/v1`` routes and Forge's own API: the routes take Forge's API credentials (401 without),
JSON bodies only (415) and image folders under ``<data dir>/dpagg-private`` only (400), the tab
and routes exist, Interrupt spends nothing, a run over 3 images of 64 px
(1 TI step) releases a file that Forge's embedding databases load without a restart and that a
txt2img prompt uses (Forge's log says so), an identical re-run spends nothing, an over-budget run
and an empty folder are refused with nothing written. Timings and log lines are printed (-s).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORGE = os.environ.get("FORGE_DIR")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FORGE, reason="set FORGE_DIR to a Forge checkout (forge-env.sh)"),
]
COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "*.egg-info", "__pycache__", "tests", "bench", ".ci", ".pytest_cache"
)
NAME = "dpaggtest"
AUTH = ("dpagg-user", "s3cret-pw")  # --api-auth: A1111 splits it at ':' (none in the password)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(
    port: int,
    path: str,
    body: dict | None = None,
    timeout: float = 600,
    auth: tuple[str, str] | None = AUTH,
    content_type: str = "application/json",
) -> tuple[int, dict]:
    import base64

    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": content_type}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=data,
        headers=headers,
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def write_images(folder: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = (rng.random((size, size, 3)) * 255).astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    forge_dir = Path(FORGE)
    python = forge_dir / ".venv" / "bin" / "python"
    ckpts = forge_dir / "models" / "Stable-diffusion"
    assert python.exists() and any(ckpts.glob("*.safetensors")), "run forge-env.sh first"
    data = tmp_path_factory.mktemp("forge_data")
    ext = data / "extensions" / "dpagg"
    shutil.copytree(REPO, ext, ignore=COPY_IGNORE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPAGG_")}
    env.pop("PYTHONPATH", None)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    timings: dict[str, float] = {}

    installer = (
        f"from modules import launch_utils; launch_utils.run_extension_installer({str(ext)!r})"
    )
    t = time.perf_counter()
    first = subprocess.run(
        [str(python), "-c", installer], cwd=forge_dir, env=env, capture_output=True, text=True
    )
    timings["install_py_s"] = time.perf_counter() - t
    assert first.returncode == 0, first.stderr[-3000:]
    t = time.perf_counter()
    second = subprocess.run(  # everything present now: no pip at all (works offline)
        [str(python), "-c", installer], cwd=forge_dir, env=env, capture_output=True, text=True
    )
    timings["install_py_again_s"] = time.perf_counter() - t
    assert second.returncode == 0 and "Installing" not in second.stdout, second.stdout
    print("\ninstall.py (first run):", first.stdout.strip() or "(nothing to install)")

    port = free_port()
    log_path = data / "forge.log"
    cmd = [
        str(python),
        "launch.py",
        "--always-cpu",
        "--skip-prepare-environment",
        "--skip-install",
        "--skip-python-version-check",
        "--skip-torch-cuda-test",
        "--no-download-sd-model",
        "--api",
        "--api-auth",
        ":".join(AUTH),
        "--server-name",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data),
        "--ckpt-dir",
        str(ckpts),
        # Forge lets gradio serve files from the data dir only (--gradio-allowed-path defaults to
        # it): with --data-dir elsewhere its own script.js, javascript/*.js and style.css answer
        # 403 and the page has no WebUI JavaScript (no gradioApp, no progress bar, no Extra
        # Networks); allowing the Forge folder serves them as a default install does
        "--gradio-allowed-path",
        str(forge_dir),
    ]
    log = open(log_path, "w")  # noqa: SIM115 - closed in the teardown
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=forge_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 600
        while "Startup time:" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()[-5000:]
            assert time.time() < deadline, "Forge did not start"
            time.sleep(1)
        timings["startup_s"] = time.perf_counter() - t
        yield {"port": port, "data": data, "log": log_path, "timings": timings, "ext": ext}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        print("\nFORGE TIMINGS:", json.dumps(timings, indent=1))
        lines = log_path.read_text(errors="replace").splitlines()
        keep = [ln for ln in lines if re.search(r"dpagg|Textual Inversion|Startup time|Error", ln)]
        print("FORGE LOG (selected lines):\n" + "\n".join(keep))


def private(data: Path, name: str = "private") -> Path:
    """A folder under ``<data dir>/dpagg-private``, the one root dpagg reads images from by
    default (Settings > dpagg)."""
    return data / "dpagg-private" / name


def settings(data: Path, **over) -> dict:
    values = {
        "images": str(private(data)),
        "name": NAME,
        "epsilon": 2.0,
        "clip_norm": 0.5,
        "steps": 1,
        "resolution": 64,
        "batch_size": 4,
        "budget_epsilon": 2.0,
        "preview": True,
        "preview_steps": 2,
        "preview_size": 64,
    }
    values.update(over)
    return values


def embedding_files(data: Path) -> list[str]:
    folder = data / "embeddings"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_forge_tab_routes_run_reuse_refuse(forge):
    port, data, timings = forge["port"], forge["data"], forge["timings"]
    log_text = forge["log"].read_text(errors="replace")
    assert "dpagg" not in "\n".join(ln for ln in log_text.splitlines() if "Error" in ln)
    assert "Error loading script: dpagg" not in log_text

    # the routes take Forge's own API credentials, JSON bodies and folders under the root only
    write_images(private(data), 3)
    status, err = call(port, "/dpagg/v1/info", auth=None)
    assert status == 401, err
    status, err = call(port, "/dpagg/v1/run", settings(data), auth=("dpagg-user", "wrong"))
    assert status == 401, err
    status, err = call(port, "/dpagg/v1/budget", settings(data), content_type="text/plain")
    assert status == 415, err
    write_images(data / "outside", 2)
    status, err = call(port, "/dpagg/v1/run", settings(data, images=str(data / "outside")))
    assert status == 400 and "dpagg_image_roots" in err["error"], err
    assert embedding_files(data) == []

    # the tab and the routes exist
    status, config = call(port, "/config")
    assert status == 200 and "Private style (DP)" in json.dumps(config)
    status, info = call(port, "/dpagg/v1/info")
    assert status == 200, info
    assert info["tab"] == "Private style (DP)"
    assert info["ledger"] == str(data / "dpagg" / "ledger.sqlite")  # the WebUI's data folder
    assert info["embeddings_dir"] == str(data / "embeddings")
    assert info["checkpoints"]

    status, plan = call(port, "/dpagg/v1/plan", settings(data))
    assert status == 200 and plan["ok"], plan
    assert plan["n"] == 3 and plan["budget"]["total"] is None and not plan["exceeds"]

    # bad input: the CLI's error, nothing written
    private(data, "empty").mkdir()
    status, err = call(port, "/dpagg/v1/run", settings(data, images=str(private(data, "empty"))))
    assert status == 400 and "no images" in err["error"].lower(), err
    assert embedding_files(data) == []

    # Interrupt during training: nothing spent, nothing written; progress and ETA while it runs
    result: dict = {}
    stop_settings = settings(data, name="dpaggstop", steps=4, batch_size=1, preview=False)

    def start() -> None:
        result["answer"] = call(port, "/dpagg/v1/run", stop_settings)

    worker = threading.Thread(target=start)
    t = time.perf_counter()
    worker.start()
    seen = None
    deadline = time.time() + 300
    while time.time() < deadline:
        _, prog = call(port, "/sdapi/v1/progress?skip_current_image=true")
        if prog and "per-image TI: step" in str(prog.get("textinfo") or prog["state"]):
            seen = prog
            break
        time.sleep(0.5)
    assert seen is not None, "no progress reported"
    call(port, "/sdapi/v1/interrupt", {})
    worker.join(600)
    timings["interrupted_run_s"] = time.perf_counter() - t
    status, err = result["answer"]
    assert status == 409 and "nothing was spent" in err["error"], err
    assert seen["progress"] > 0 and seen["eta_relative"] >= 0
    assert embedding_files(data) == []
    status, budget = call(port, "/dpagg/v1/budget", {"images": str(private(data))})
    assert status == 200 and budget["releases"] == 0 and budget["spent"]["epsilon"] == 0

    # the run: released, loaded by Forge's embedding databases without a restart
    t = time.perf_counter()
    status, report = call(port, "/dpagg/v1/run", settings(data))
    timings["first_run_s"] = time.perf_counter() - t
    assert status == 200, report
    timings.update({f"first_run_{k}": v for k, v in report["timings"].items()})
    assert report["prompt_word"] == NAME and not report["reused"]
    assert Path(report["file"]) == data / "embeddings" / f"{NAME}.safetensors"
    assert report["preview"] and Path(report["preview"]).is_file()  # the with/without grid
    assert (data / "embeddings" / f"{NAME}.preview.png").is_file()  # the card's thumbnail
    from safetensors.torch import load_file

    tensors = load_file(report["file"])
    assert set(tensors) == {"emb_params"} and tuple(tensors["emb_params"].shape) == (1, 768)
    status, emb = call(port, "/sdapi/v1/embeddings")
    assert status == 200 and emb["loaded"][NAME]["shape"] == 768, emb
    assert emb["loaded"][NAME]["vectors"] == 1

    used = f"[Textual Inversion] Used Embedding [{NAME}] in CLIP of [clip_l]"
    before = forge["log"].read_text(errors="replace").count(used)
    t = time.perf_counter()
    status, out = call(
        port,
        "/sdapi/v1/txt2img",
        {
            "prompt": f"a lighthouse, in the style of {NAME}",
            "steps": 2,
            "width": 64,
            "height": 64,
            "sampler_name": "Euler",
            "seed": 1,
        },
    )
    timings["txt2img_s"] = time.perf_counter() - t
    assert status == 200 and out["images"], out
    assert f"TI: {NAME}" in json.loads(out["info"])["infotexts"][0]
    time.sleep(1)
    assert forge["log"].read_text(errors="replace").count(used) > before

    # an identical re-run spends nothing and writes nothing new
    files = embedding_files(data)
    t = time.perf_counter()
    status, again = call(port, "/dpagg/v1/run", settings(data, preview=False))
    timings["identical_rerun_s"] = time.perf_counter() - t
    assert status == 200 and again["reused"], again
    assert again["file"] == report["file"]
    assert again["budget"]["spent_epsilon"] == pytest.approx(report["budget"]["spent_epsilon"])
    assert embedding_files(data) == files

    # over budget (budget 2 spent; a new plan): refused before training, nothing written
    t = time.perf_counter()
    status, err = call(port, "/dpagg/v1/run", settings(data, name="dpaggmore", epsilon=1.0))
    timings["over_budget_refusal_s"] = time.perf_counter() - t
    assert status == 409 and "budget" in err["error"] and "nothing was spent" in err["error"]
    assert embedding_files(data) == files
    status, plan = call(port, "/dpagg/v1/plan", settings(data, epsilon=1.0))
    assert plan["exceeds"] and "EXCEED" in plan["html"]
    assert (data / "dpagg" / "ledger.sqlite").is_file()

    # with the model now loaded: another image set (its own budget) released under a new word is
    # usable at once: the loaded model's own embedding database was reloaded, no restart
    write_images(private(data, "private2"), 2, seed=5)
    t = time.perf_counter()
    status, second = call(
        port,
        "/dpagg/v1/run",
        settings(data, images=str(private(data, "private2")), name="dpaggtwo", preview=False),
    )
    timings["second_set_run_s"] = time.perf_counter() - t
    assert status == 200 and not second["reused"], second
    used = "[Textual Inversion] Used Embedding [dpaggtwo] in CLIP of [clip_l]"
    assert used not in forge["log"].read_text(errors="replace")
    status, out = call(
        port,
        "/sdapi/v1/txt2img",
        {"prompt": "a cat, in the style of dpaggtwo", "steps": 2, "width": 64, "height": 64},
    )
    assert status == 200 and "TI: dpaggtwo" in json.loads(out["info"])["infotexts"][0]
    time.sleep(1)
    assert used in forge["log"].read_text(errors="replace")
