"""Embedding sets and files: real files loaded by the real consumer (diffusers), privacy guards.

The central check: a released SD1 file, loaded with diffusers ``load_textual_inversion`` into a
pipeline with the real CLIP tokenizer, changes the text encoder's output exactly as its rows
predict (compared with a fresh encoder whose token embeddings at those positions are replaced
by the file's rows).
"""

from __future__ import annotations

import logging
import os
import pickle
import string
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from dpagg_core.errors import DpaggError
from dpagg_core.io import embeddings as E
from dpagg_core.io import names
from dpagg_core.io import private_file as P
from dpagg_core.io import released_file as R
from dpagg_core.io.embeddings import EmbeddingSet
from dpagg_core.io.images import dataset_id_for

HS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
VOCAB = 49408
KEY = bytes(range(32))  # a ledger identity key (tests/test_identity.py covers real ledgers)


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    monkeypatch.setenv("DPAGG_DATA_DIR", str(tmp_path / "dpagg-data"))
    monkeypatch.setenv("DPAGG_LEDGER", str(tmp_path / "dpagg-data" / "ledger.sqlite"))


def _record() -> dict[str, str]:
    return {
        "epsilon": "2.0",
        "delta": "1e-05",
        "sigma": "0.37",
        "clip_norm": "1.5",
        "n": "12",
        "m": "12",
        "sampling": "full",
        "neighbouring": "replace_one",
        "accountant": "analytic_gaussian",
        "dpagg_version": "0.1.0",
        "base_model_id": "tiny-sd1",
    }


def _header(path: Path) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], str]]]:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: (tuple(f.get_tensor(k).shape), str(f.get_tensor(k).dtype)) for k in f.keys()}
    return meta, tensors


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _manual_hidden(fresh_te, input_ids: torch.Tensor, rows: dict[int, torch.Tensor], layer):
    """Run a fresh (never-loaded) text encoder with the token embeddings at ``rows`` positions
    replaced by the given vectors: what a prompt with the embedding should produce."""
    ids = input_ids.clone()
    for pos in rows:
        ids[0, pos] = 0  # any in-vocabulary id; its embedding is overwritten below

    def hook(_module, _inp, out):
        out = out.clone()
        for pos, row in rows.items():
            out[0, pos] = row
        return out

    handle = fresh_te.get_input_embeddings().register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = fresh_te(ids, output_hidden_states=True)
    finally:
        handle.remove()
    return out.last_hidden_state if layer is None else out.hidden_states[layer]


def _placeholder_rows(tokenizer, prompt: str, token: str, v: int, vec: torch.Tensor):
    names = [token] + [f"{token}_{i}" for i in range(1, v)]
    new_ids = tokenizer.convert_tokens_to_ids(names)
    ids = tokenizer(
        prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    rows = {}
    for pos, tid in enumerate(ids[0].tolist()):
        if tid in new_ids:
            rows[pos] = vec[new_ids.index(tid)]
    return ids, rows, new_ids


# --------------------------------------------------------------------------------------------
# The real consumer: diffusers textual inversion loading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("v", [1, 3])
def test_sd1_release_loads_in_diffusers_and_acts_exactly_as_its_rows(tmp_path, v):
    from tiny_models import tiny_pipeline, tiny_text_encoder

    gen = torch.Generator().manual_seed(v)
    vec = torch.randn(v, 32, generator=gen) * 3.0
    out = tmp_path / "models" / "embeddings"
    path = R.write_released(out, "mystyle", {"emb_params": vec}, _record())
    assert path == out / "mystyle.safetensors"

    meta, tensors = _header(path)
    assert tensors == {"emb_params": ((v, 32), "torch.float32")}
    assert meta == {**_record(), "format": "dpagg-release/1"}

    pipe = tiny_pipeline(32, seed=0)
    n_before = len(pipe.tokenizer)
    pipe.load_textual_inversion(str(path), token="<mystyle>")
    assert len(pipe.tokenizer) == n_before + v

    prompt = "a lighthouse at dusk, in the style of <mystyle>"
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids, rows, new_ids = _placeholder_rows(pipe.tokenizer, converted, "<mystyle>", v, vec)
    assert new_ids == list(range(VOCAB, VOCAB + v))
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(table[new_ids], vec)  # exact: the file's rows, bit for bit
    assert len(rows) == v and sorted(rows) == list(range(min(rows), min(rows) + v))

    fresh = tiny_text_encoder(32, seed=0)
    assert torch.equal(fresh.get_input_embeddings().weight, table[:VOCAB])  # old rows untouched

    with torch.no_grad():
        got, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        without, _ = pipe.encode_prompt("a lighthouse at dusk, in the style of", "cpu", 1, False)
    expected = _manual_hidden(fresh, ids, rows, layer=None)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # The embedding matters: the prompt without it encodes differently (from its position on).
    first = min(rows)
    assert (got[0, first:] - without[0, first:]).abs().max() > 1e-2
    # ...and so does its value: zeroing the rows gives yet another encoding.
    zeroed = _manual_hidden(fresh, ids, {p: torch.zeros(32) for p in rows}, layer=None)
    assert (got - zeroed).abs().max() > 1e-2


def test_a1111_pt_beside_safetensors_loads_in_diffusers(tmp_path):
    from tiny_models import tiny_pipeline

    vec = torch.randn(2, 32, generator=torch.Generator().manual_seed(7))
    path = R.write_released(tmp_path, "legacy", {"emb_params": vec}, _record(), a1111_pt=True)
    pt = tmp_path / "legacy.pt"
    assert _files(tmp_path) == ["legacy.pt", "legacy.safetensors"]

    data = torch.load(pt, weights_only=True)  # what ComfyUI/diffusers do: no arbitrary pickle
    assert set(data) >= {"string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert data["name"] == "legacy" and data["step"] == 0 and data["sd_checkpoint"] is None
    assert torch.equal(data["string_to_param"]["*"], vec)
    assert data["dpagg_record"] == {**_record(), "format": "dpagg-release/1"}
    assert str(tmp_path).encode() not in pt.read_bytes()

    pipe = tiny_pipeline(32, seed=0)
    pipe.load_textual_inversion(str(pt), token="<legacy>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<legacy>", "<legacy>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), vec)

    vecs, rec = R.read_released(pt)
    assert torch.equal(vecs["emb_params"], vec) and rec["epsilon"] == "2.0"
    vecs2, _ = R.read_released(path)
    assert torch.equal(vecs2["emb_params"], vec)


def _tiny_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from tiny_models import tiny_text_encoder, tiny_vae
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from dpagg_core.showcase.minimodel import small_clip_text_config
    from dpagg_core.training.tokenizer import clip_tokenizer

    def te2():
        torch.manual_seed(1)
        cfg = CLIPTextConfig(**small_clip_text_config(64, projection_dim=32))
        return CLIPTextModelWithProjection(cfg).eval()

    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(32, seed=0),
        text_encoder_2=te2(),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=None,
        scheduler=EulerDiscreteScheduler(),
        add_watermarker=False,
    )
    return pipe, tiny_text_encoder(32, seed=0), te2()


def test_sdxl_release_has_exactly_clip_l_clip_g_and_loads_with_two_calls(tmp_path):
    gen = torch.Generator().manual_seed(3)
    vl, vg = torch.randn(2, 32, generator=gen), torch.randn(2, 64, generator=gen)
    path = R.write_released(tmp_path, "xlstyle", {"clip_l": vl, "clip_g": vg}, _record())
    meta, tensors = _header(path)
    assert tensors == {"clip_l": ((2, 32), "torch.float32"), "clip_g": ((2, 64), "torch.float32")}
    assert meta["format"] == "dpagg-release/1"

    from safetensors.torch import load_file

    sd = load_file(str(path))
    pipe, fresh1, fresh2 = _tiny_sdxl()
    # The documented diffusers pattern for SDXL embeddings: one call per text encoder.
    pipe.load_textual_inversion(
        sd["clip_l"], token="<xl>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        sd["clip_g"], token="<xl>", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    for te, tok, vec in (
        (pipe.text_encoder, pipe.tokenizer, vl),
        (pipe.text_encoder_2, pipe.tokenizer_2, vg),
    ):
        ids = tok.convert_tokens_to_ids(["<xl>", "<xl>_1"])
        assert ids == [VOCAB, VOCAB + 1]
        assert torch.equal(te.get_input_embeddings().weight[ids].detach(), vec)

    prompt = "a red barn, <xl>"
    with torch.no_grad():
        got = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]
        base = pipe.encode_prompt("a red barn,", device="cpu", do_classifier_free_guidance=False)[0]
    assert got.shape == (1, 77, 96)
    converted = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
    ids1, rows1, _ = _placeholder_rows(pipe.tokenizer, converted, "<xl>", 2, vl)
    ids2, rows2, _ = _placeholder_rows(pipe.tokenizer_2, converted, "<xl>", 2, vg)
    exp1 = _manual_hidden(fresh1, ids1, rows1, layer=-2)  # SDXL uses the penultimate layer
    exp2 = _manual_hidden(fresh2, ids2, rows2, layer=-2)
    torch.testing.assert_close(got, torch.cat([exp1, exp2], dim=-1), atol=1e-6, rtol=0)
    assert (got - base).abs().max() > 1e-2


def test_released_layout_rules(tmp_path):
    # CLIP image embedding: [1, dim]; a 1-D vector is stored as one row.
    p = R.write_released(tmp_path, "img", {"image_embeds": np.ones(16)}, _record())
    assert _header(p)[1] == {"image_embeds": ((1, 16), "torch.float32")}
    # float64 mechanism output is stored as float32.
    p = R.write_released(tmp_path, "f64", {"emb_params": np.full((2, 8), 0.5)}, _record())
    assert torch.equal(R.read_released(p)[0]["emb_params"], torch.full((2, 8), 0.5))
    bad = [
        {"emb_params": torch.zeros(1, 8), "clip_l": torch.zeros(1, 8)},  # mixed layouts
        {"clip_l": torch.zeros(1, 8)},  # SDXL needs both
        {"clip_l": torch.zeros(2, 64), "clip_g": torch.zeros(2, 32)},  # swapped widths
        {"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 64)},  # different v
        {"emb_params": torch.zeros(2, 3, 8)},  # an EmbeddingSet, not a release
        {"emb_params": torch.tensor([[1.0, float("nan")]])},
        {"emb_params": torch.zeros(76, 8)},  # does not fit CLIP's context
        {"emb_params": torch.zeros(2, 8, dtype=torch.int64)},
    ]
    for i, vecs in enumerate(bad):
        with pytest.raises(DpaggError):
            R.write_released(tmp_path, f"bad{i}", vecs, _record())
    with pytest.raises(DpaggError, match="SD1/SD2"):
        R.write_released(
            tmp_path,
            "xl",
            {"clip_l": torch.zeros(1, 8), "clip_g": torch.zeros(1, 16)},
            _record(),
            a1111_pt=True,
        )
    assert _files(tmp_path) == ["f64.safetensors", "img.safetensors"]


# --------------------------------------------------------------------------------------------
# Metadata: the privacy record and nothing else
# --------------------------------------------------------------------------------------------


def test_metadata_holds_record_and_no_input_paths_or_names(tmp_path):
    images = tmp_path / "Alice private photos"
    images.mkdir()
    names = ["IMG_0001_alice_passport.png", "holiday-secret.jpg"]
    contents = []
    for i, nm in enumerate(names):
        (images / nm).write_bytes(bytes([i]) * 100)
        contents.append((images / nm).read_bytes())
    record = {**_record(), "dataset_id": dataset_id_for(contents, key=KEY)}
    out = tmp_path / "out"
    path = R.write_released(out, "mystyle", {"emb_params": torch.ones(1, 8)}, record, a1111_pt=True)

    meta, _ = _header(path)
    assert meta == {**record, "format": "dpagg-release/1"}  # the exact keys written
    for f in (path, out / "mystyle.pt"):
        raw = f.read_bytes()
        for needle in [
            str(tmp_path),
            str(images),
            "Alice",
            "passport",
            "holiday",
            str(Path.home()),
        ]:
            assert needle.encode() not in raw, (f.name, needle)

    # A local path in the record is refused before anything is written.
    for value in [
        str(images / names[0]),
        "C:\\Users\\alice\\ckpt.safetensors",
        "~/models/x",
        "models\\sd15.ckpt",
    ]:
        with pytest.raises(DpaggError, match="local path"):
            R.write_released(
                out, "leaky", {"emb_params": torch.ones(1, 8)}, {"base_model_id": value}
            )
    with pytest.raises(DpaggError, match="strings"):
        R.write_released(out, "leaky", {"emb_params": torch.ones(1, 8)}, {"epsilon": 2.0})
    with pytest.raises(DpaggError, match="reserved"):
        R.write_released(out, "leaky", {"emb_params": torch.ones(1, 8)}, {"format": "x"})
    assert _files(out) == ["mystyle.pt", "mystyle.safetensors"]


# --------------------------------------------------------------------------------------------
# Names, no overwrite, atomic writes
# --------------------------------------------------------------------------------------------


@HS
@given(st.text(alphabet=string.printable + "é/\\.\x00\x7f…ß", max_size=120))
def test_sanitized_names_are_plain_file_names(name):
    try:
        clean = names.sanitize_name(name)
    except DpaggError as exc:
        assert str(exc)  # a message saying what to use
        return
    assert clean and len(clean) <= 100
    assert "/" not in clean and "\\" not in clean and ".." not in clean
    assert not clean.startswith(".") and not clean.endswith(".")
    assert all(c.isalnum() or c in "-_." for c in clean)
    with tempfile.TemporaryDirectory() as d:
        p = R.write_released(d, clean, {"emb_params": torch.ones(1, 4)}, {})
        assert p.parent == Path(d) and p.name == f"{clean}.safetensors"


def test_sanitize_name_cases():
    assert names.sanitize_name("  my_style-2.v1 ") == "my_style-2.v1"
    assert names.sanitize_name("mystyle.safetensors") == "mystyle"
    assert names.sanitize_name("Stil_über") == "Stil_über"
    for bad, why in [
        ("", "empty"),
        ("   ", "empty"),
        ("../x", "separator"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("a..b", "'..'"),
        (".hidden", "dot"),
        ("x" * 101, "at most 100"),
        ("bad\x00name", "control"),
        ("my style", "letters, digits"),
        ("a:b", "letters, digits"),
        ("(w:1.2)", "letters, digits"),
        ("CON", "reserved"),
    ]:
        with pytest.raises(DpaggError, match=why):
            names.sanitize_name(bad)


def test_never_overwrites_and_next_free_name(tmp_path):
    first = R.write_released(tmp_path, "mystyle", {"emb_params": torch.ones(1, 4)}, {})
    before = first.read_bytes()
    with pytest.raises(DpaggError, match=r"mystyle.*mystyle-2"):
        R.write_released(tmp_path, "mystyle", {"emb_params": torch.zeros(1, 4)}, {})
    with pytest.raises(DpaggError, match="already exists"):
        R.write_released(tmp_path, "MyStyle", {"emb_params": torch.zeros(1, 4)}, {})
    assert first.read_bytes() == before

    assert names.next_free_name(tmp_path, "mystyle") == "mystyle-2"
    R.write_released(
        tmp_path, names.next_free_name(tmp_path, "mystyle"), {"emb_params": torch.ones(1, 4)}, {}
    )
    assert names.next_free_name(tmp_path, "mystyle") == "mystyle-3"
    assert names.next_free_name(tmp_path, "other") == "other"
    assert names.next_free_name(tmp_path / "missing", "x") == "x"
    assert len(names.next_free_name(tmp_path, "m" * 100)) <= 100

    # ComfyUI resolves embedding:name in sub-folders too: a clash there is refused as well.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.pt").write_bytes(b"x")
    assert names.next_free_name(tmp_path, "deep") == "deep-2"
    with pytest.raises(DpaggError, match="deep"):
        R.write_released(tmp_path, "deep", {"emb_params": torch.ones(1, 4)}, {})

    # An existing .pt blocks an a1111 pair: nothing at all is written.
    (tmp_path / "pair.pt").write_bytes(b"x")
    with pytest.raises(DpaggError):
        R.write_released(tmp_path, "pair", {"emb_params": torch.ones(1, 4)}, {}, a1111_pt=True)
    assert not (tmp_path / "pair.safetensors").exists()


def test_writes_are_atomic_and_leave_no_temp_files(tmp_path, monkeypatch):
    R.write_released(tmp_path, "ok", {"emb_params": torch.ones(1, 4)}, {}, a1111_pt=True)
    assert _files(tmp_path) == ["ok.pt", "ok.safetensors"]

    def boom(*_a, **_k):
        raise OSError("disk full")

    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", boom)  # crash while the bytes are being written
    with pytest.raises(OSError):
        R.write_released(tmp_path, "crash1", {"emb_params": torch.ones(1, 4)}, {})
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(os, "link", boom)  # no hard links and the rename fails too
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        R.write_released(tmp_path, "crash2", {"emb_params": torch.ones(1, 4)}, {})
    assert _files(tmp_path) == ["ok.pt", "ok.safetensors"]

    # Without hard links the rename fallback still writes the whole file.
    monkeypatch.setattr(os, "replace", real_replace)
    p = R.write_released(tmp_path, "nolink", {"emb_params": torch.ones(1, 4)}, {})
    assert torch.equal(R.read_released(p)[0]["emb_params"], torch.ones(1, 4))

    # The second file of a pair fails: the first is removed, so the pair is all-or-nothing.
    real_save = torch.save
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        R.write_released(tmp_path, "half", {"emb_params": torch.ones(1, 4)}, {}, a1111_pt=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert _files(tmp_path) == ["nolink.safetensors", "ok.pt", "ok.safetensors"]


# --------------------------------------------------------------------------------------------
# EmbeddingSet and the private on-disk form
# --------------------------------------------------------------------------------------------


def _eset(n=4, v=2, family="sd1", centre=True, seed=0, widths=None) -> EmbeddingSet:
    gen = torch.Generator().manual_seed(seed)
    keys = E.KEYS_BY_FAMILY[family]
    widths = widths or {"emb_params": 8, "clip_l": 8, "clip_g": 12, "image_embeds": 6}
    vecs = {k: torch.randn(n, v, widths[k], generator=gen) for k in keys}
    cen = {k: torch.randn(v, widths[k], generator=gen) for k in keys} if centre else None
    return EmbeddingSet(
        vectors=vecs,
        kind=E.KIND_OF_FAMILY[family],
        model_family=family,
        base_model_id="tiny-model",
        centre=cen,
        initializer="painting" if centre else None,
        dataset_id="ds-0123",
    )


@HS
@given(
    n=st.integers(1, 5),
    v=st.integers(1, 3),
    family=st.sampled_from(["sd1", "sd2", "sdxl", "clip_vision"]),
    centre=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_private_round_trip(n, v, family, centre, seed):
    eset = _eset(n, v, family, centre, seed)
    with tempfile.TemporaryDirectory() as d:
        path = P.save_private(eset, Path(d) / "private" / "set.private.safetensors", key=KEY)
        back = P.load_private(path, key=KEY)
    assert back.keys == eset.keys and back.n == n and back.num_vectors == v
    for k in eset.keys:
        assert torch.equal(back.vectors[k], eset.vectors[k])
        assert (back.centre is None) == (not centre)
        if centre:
            assert torch.equal(back.centre[k], eset.centre[k])
    for attr in ("kind", "model_family", "base_model_id", "initializer", "dataset_id"):
        assert getattr(back, attr) == getattr(eset, attr)
    assert P.authentication_tag(back, KEY) == P.authentication_tag(eset, KEY)
    assert np.array_equal(back.flat(), eset.flat())


@HS
@given(n=st.integers(1, 4), v=st.integers(1, 3), family=st.sampled_from(["sd1", "sdxl"]))
def test_flat_unflat_inverse(n, v, family):
    eset = _eset(n, v, family, centre=True)
    flat = eset.flat()
    assert flat.dtype == np.float64 and flat.shape == (n, eset.flat_dim)
    widths = eset.encoder_widths
    assert eset.flat_dim == v * sum(widths.values())
    for i in range(n):
        back = eset.unflat(flat[i])
        assert list(back) == list(eset.keys)
        for k in eset.keys:
            assert back[k].dtype == torch.float32 and torch.equal(back[k], eset.vectors[k][i])
    cen = eset.unflat(eset.flat_centre())
    assert all(torch.equal(cen[k], eset.centre[k]) for k in eset.keys)
    assert np.allclose(
        np.linalg.norm(flat[0]),
        np.sqrt(sum(float((eset.vectors[k][0] ** 2).sum()) for k in eset.keys)),
    )
    with pytest.raises(DpaggError, match="shape"):
        eset.unflat(flat[0][:-1])


def test_embedding_set_validation():
    good = _eset()
    assert good.n == 4 and good.encoder_widths == {"emb_params": 8}
    assert _eset(family="sdxl").encoder_widths == {"clip_l": 8, "clip_g": 12}
    z = torch.zeros
    ti, sd1, sdxl = "textual_inversion", "sd1", "sdxl"
    one = {"emb_params": z(3, 1, 8)}
    cases = [
        ((one, ti, "sd9", None), "model_family"),
        ((one, "lora", sd1, None), "kind"),
        ((one, "clip_image", sd1, None), "does not match"),
        (({"clip_l": z(3, 1, 8)}, ti, sd1, None), "keys"),
        (({"emb_params": z(3, 8)}, ti, sd1, None), "3-D"),
        (({"emb_params": z(3, 1, 8, dtype=torch.float64)}, ti, sd1, None), "float32"),
        (({"emb_params": torch.full((3, 1, 8), float("inf"))}, ti, sd1, None), "NaN or inf"),
        (({"clip_l": z(3, 1, 8), "clip_g": z(2, 1, 12)}, ti, sdxl, None), "images"),
        (({"clip_l": z(3, 1, 8), "clip_g": z(3, 2, 12)}, ti, sdxl, None), "vectors per image"),
        (({"clip_l": z(3, 1, 12), "clip_g": z(3, 1, 8)}, ti, sdxl, None), "swapped"),
        ((one, ti, sd1, {"emb_params": z(2, 8)}), "centre"),
        ((one, ti, sd1, {"emb_params": z(1, 8, dtype=torch.float16)}), "float32"),
        ((one, ti, sd1, {"clip_l": z(1, 8)}), "centre"),
        (({"emb_params": z(3, 76, 8)}, ti, sd1, None), "75"),
    ]
    for (vectors, kind, family, centre), match in cases:
        with pytest.raises(DpaggError, match=match):
            EmbeddingSet(vectors=vectors, kind=kind, model_family=family, centre=centre)


def test_authentication_tag_and_dataset_id_are_keyed_and_sensitive():
    a, b = _eset(seed=1), _eset(seed=1)
    assert P.authentication_tag(a, KEY) == P.authentication_tag(b, KEY)
    b.vectors["emb_params"][2, 1, 3] += 1e-6
    assert P.authentication_tag(a, KEY) != P.authentication_tag(b, KEY)
    imgs = [b"image-one", b"image-two", b"image-three"]
    ds = dataset_id_for(imgs, key=KEY)
    assert (
        ds == dataset_id_for(reversed(imgs), key=KEY) == dataset_id_for(iter(imgs[::-1]), key=KEY)
    )
    assert ds != dataset_id_for(imgs[:2], key=KEY)
    assert ds != dataset_id_for(imgs + imgs[:1], key=KEY)  # duplicates count
    assert ds != dataset_id_for([b"image-one", b"image-two", b"image-thref"], key=KEY)
    import hashlib

    for im in imgs:
        assert hashlib.sha256(im).hexdigest()[:32] not in ds
    other = bytes(reversed(KEY))  # another ledger's key: another identity space
    assert dataset_id_for(imgs, key=other) != ds
    assert P.authentication_tag(a, other) != P.authentication_tag(a, KEY)
    with pytest.raises(DpaggError, match="no images"):
        dataset_id_for([], key=KEY)
    with pytest.raises(DpaggError):
        dataset_id_for(b"one blob", key=KEY)
    with pytest.raises(DpaggError, match="raw bytes"):
        dataset_id_for(["a string"], key=KEY)


@pytest.mark.parametrize(
    "folder", ["models/embeddings", "ComfyUI/models/Embeddings/sub", "sd/textual_inversion"]
)
def test_private_refused_in_prompt_embedding_folders(tmp_path, folder):
    target = tmp_path / folder / "set.safetensors"
    with pytest.raises(DpaggError, match="refusing"):
        P.save_private(_eset(), target, key=KEY)
    assert not (tmp_path / folder).exists() or _files(tmp_path / folder) == []


def test_private_refused_next_to_embedding_files_without_unpickling(tmp_path):
    rel = tmp_path / "released"
    R.write_released(rel, "style", {"emb_params": torch.ones(1, 8)}, {})
    with pytest.raises(DpaggError, match="style.safetensors"):
        P.save_private(_eset(), rel / "set.safetensors", key=KEY)

    # A foreign diffusers-style embedding (single key, no dpagg metadata).
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    save_file(
        {"clip_l": torch.ones(1, 8), "clip_g": torch.ones(1, 16)}, str(foreign / "x.safetensors")
    )
    with pytest.raises(DpaggError, match="x.safetensors"):
        P.save_private(_eset(), foreign / "set.safetensors", key=KEY)

    # Torch files are scanned for TI markers without being unpickled: a hostile pickle's
    # payload never runs, with or without markers in it.
    class Payload:
        def __init__(self, marker: Path, extra: str):
            self.marker, self.extra = marker, extra

        def __reduce__(self):
            return (os.mkdir, (str(self.marker),))

    for sub, extra in [("hostile_plain", "nothing"), ("hostile_ti", "emb_params")]:
        folder = tmp_path / sub
        folder.mkdir()
        marker = tmp_path / f"{sub}-ran"
        blob = pickle.dumps({"x": Payload(marker, extra), "k": extra})
        (folder / "thing.pt").write_bytes(blob)
        if extra == "emb_params":
            with pytest.raises(DpaggError, match="thing.pt"):
                P.save_private(_eset(), folder / "set.safetensors", key=KEY)
        else:
            P.save_private(_eset(), folder / "set.safetensors", key=KEY)
        assert not marker.exists()

    # And an A1111 .pt (zip format) is recognised.
    a1111 = tmp_path / "a1111"
    R.write_released(a1111, "old", {"emb_params": torch.ones(1, 8)}, {}, a1111_pt=True)
    (a1111 / "old.safetensors").unlink()
    with pytest.raises(DpaggError, match="old.pt"):
        P.save_private(_eset(), a1111 / "set.safetensors", key=KEY)


def test_private_file_is_marked_warned_never_overwritten_and_unloadable_as_ti(tmp_path, caplog):
    from tiny_models import tiny_pipeline

    eset = _eset(n=3, v=1, widths={"emb_params": 32})
    with caplog.at_level(logging.WARNING, logger="dpagg_core.io.private_file"):
        path = P.save_private(eset, tmp_path / "priv" / "set.safetensors", key=KEY)
    assert any("PRIVATE" in r.getMessage() for r in caplog.records)
    meta, tensors = _header(path)
    assert meta["dpagg_private_embedding_set"] == "true"
    assert set(tensors) == {"per_image.emb_params", "public_centre.emb_params"}

    before = path.read_bytes()
    with pytest.raises(DpaggError, match="already exists"):
        P.save_private(_eset(seed=5), path, key=KEY)
    assert path.read_bytes() == before
    with pytest.raises(DpaggError, match=".safetensors"):
        P.save_private(eset, tmp_path / "priv" / "set.pt", key=KEY)

    # No consumer takes it for an embedding; dpagg's own reader refuses it too.
    pipe = tiny_pipeline(32)
    with pytest.raises(ValueError):
        pipe.load_textual_inversion(str(path), token="<leak>")
    with pytest.raises(DpaggError, match="PRIVATE"):
        R.read_released(path)
    assert R.describe(path)["file"] == "private embedding set"
    assert "vector_norms" not in R.describe(path)

    released = R.write_released(tmp_path / "rel", "r", {"emb_params": torch.ones(1, 4)}, {})
    with pytest.raises(DpaggError, match="not a dpagg private"):
        P.load_private(released, key=KEY)

    # Tampering is detected.
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    t["per_image.emb_params"][0, 0, 0] += 1.0
    save_file(t, str(tmp_path / "priv" / "edited.safetensors"), metadata=meta)
    with pytest.raises(DpaggError, match="authentication"):
        P.load_private(tmp_path / "priv" / "edited.safetensors", key=KEY)


def test_repr_shows_no_private_values():
    """A repr reaches ComfyUI's Preview Any, logs and tracebacks: shapes and labels only."""
    eset = _eset(seed=3)
    text = repr(eset) + str(eset) + f"{eset}"
    assert "n=" in text and "private" in text
    values = eset.vectors["emb_params"].reshape(-1)[:20].tolist()
    for v in values:
        assert f"{v:.4f}" not in text and f"{v:.3f}" not in text
    assert "tensor" not in text.lower()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_released_files_get_the_umask_mode_private_files_stay_0600(tmp_path, umask):
    """Released embeddings are public by design: 0666 minus the umask, like any file the user's
    tools write (a shared models folder can read them); per-image files stay owner-only."""
    old = os.umask(umask)
    try:
        path = R.write_released(
            tmp_path / "out", "pub", {"emb_params": torch.ones(1, 8)}, _record(), a1111_pt=True
        )
        priv = P.save_private(
            _eset(n=2, v=1, widths={"emb_params": 8}), tmp_path / "p" / "s.safetensors", key=KEY
        )
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert path.with_suffix(".pt").stat().st_mode & 0o777 == 0o666 & ~umask
    assert priv.stat().st_mode & 0o777 == 0o600


def test_inspect_shows_the_diffusers_call_with_token_and_it_loads_two_files(tmp_path):
    """Without ``token=`` diffusers names the token after the tensor key (``emb_params``) and a
    second file fails; ``dpagg inspect`` shows the call with ``token="<name>"``, which loads two
    releases side by side."""
    from tiny_models import tiny_pipeline

    pipe = tiny_pipeline(32)
    paths = [
        R.write_released(tmp_path, name, {"emb_params": torch.randn(1, 32)}, _record())
        for name in ("styleone", "styletwo")
    ]
    for path in paths:
        use = R.describe(path)["use"]
        assert use["diffusers"].startswith(
            f'pipe.load_textual_inversion("{path.name}", token="{path.stem}")'
        )
        assert use["ComfyUI"].startswith(f"embedding:{path.stem}")
        pipe.load_textual_inversion(str(path), token=path.stem)
    ids = pipe.tokenizer.convert_tokens_to_ids(["styleone", "styletwo"])
    assert len(set(ids)) == 2 and pipe.tokenizer.unk_token_id not in ids
    xl = R.write_released(
        tmp_path, "xl", {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, _record()
    )
    assert (
        "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2"
        in (R.describe(xl)["use"]["diffusers"])
    )
