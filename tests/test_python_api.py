"""The public Python API (``import dpagg_core``): the README's "Python" snippet runs as written,
on a tiny model built in code, and ``import dpagg_core`` stays light."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_models import tiny_pipeline

import dpagg_core
from dpagg_core.io.released_file import read_released
from dpagg_core.training.ti import TIConfig

README = Path(__file__).resolve().parents[1] / "README.md"
# The paths the snippet names, relative to the folder it runs in.
IMAGES, MODEL = "private/mystyle", "models/sd15"


def readme_snippet() -> str:
    """The fenced ``python`` block of the README's "## Python" section."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python section holds exactly one python block"
    return blocks[0]


@pytest.mark.usefixtures("one_torch_thread")
def test_readme_python_snippet_releases_through_the_ledger(tmp_path, monkeypatch, capsys):
    code = readme_snippet()
    assert f'"{IMAGES}"' in code and f'"{MODEL}"' in code
    (tmp_path / IMAGES).mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (40, 48), (50 * i, 200 - 40 * i, 90)).save(tmp_path / IMAGES / f"{i}.png")
    tiny_pipeline(hidden_size=32, seed=0).save_pretrained(tmp_path / MODEL)
    monkeypatch.chdir(tmp_path)  # the ledger is conftest's DPAGG_LEDGER, in a temp folder
    asked = []

    def few_steps(**kw):  # the snippet's settings, but 2 steps: the tiny model learns nothing
        asked.append(kw)
        return TIConfig(**{**kw, "steps": 2})

    monkeypatch.setattr(dpagg_core, "TIConfig", few_steps)

    namespace: dict = {}
    exec(compile(code, str(README) + ":Python", "exec"), namespace)  # noqa: S102 - our README

    assert asked and asked[0]["steps"] > 2  # the snippet went through the facade's TIConfig
    out = namespace["out"]
    assert out.path == (tmp_path / "embeddings" / "mystyle.safetensors").resolve()
    tensors, record = read_released(out.path)
    assert tuple(tensors["emb_params"].shape) == (1, 32)
    assert record["n"] == "4" and float(record["epsilon"]) <= 1.0
    assert "embedding:mystyle" in capsys.readouterr().out
    ledger = dpagg_core.Ledger()
    assert ledger.status(namespace["images"].dataset_id)["releases"] == 1
    assert not out.reused

    again = namespace["dpagg"].release_embeddings(  # the identical request: recorded, free
        namespace["eset"],
        plan=namespace["plan"],
        clip_norm=0.5,
        name="mystyle",
        out_dir="embeddings",
        ledger=ledger,
    )
    assert again.reused and again.path == out.path
    assert ledger.status(namespace["images"].dataset_id)["releases"] == 1


def test_facade_names_are_documented_and_lazy():
    for name in dpagg_core.__all__:
        value = getattr(dpagg_core, name)
        assert name == "__version__" or value.__doc__, name
    assert set(dpagg_core.__all__) <= set(dir(dpagg_core))
    with pytest.raises(AttributeError):
        dpagg_core.no_such_name  # noqa: B018
    light = subprocess.run(
        [sys.executable, "-c", "import sys, dpagg_core; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert light.stdout.strip() == "False"
