"""Image loading: real files written with Pillow, loaded by dpagg_core.io.images.

The canonical decode is pinned against the stored values of each image kind
(``image_kinds.py``); that it equals ComfyUI's Load Image is checked against a real ComfyUI in
``test_comfyui_integration.py``.
"""

from __future__ import annotations

import io
import logging
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from image_kinds import KINDS, write_mixed_sizes
from PIL import Image

from dpagg_core.errors import DpaggError
from dpagg_core.io.images import (
    dataset_id_for,
    decode_rgb,
    load_image_folder,
    load_images,
    pixel_digest,
)
from dpagg_core.privacy.ledger import identity_key

TOL = 1.0 / 127.5 + 1e-6  # one 8-bit level in [-1, 1] units


def solid(color, size=(40, 24), mode="RGB"):
    return Image.new(mode, size, color)


def to_unit(rgb):
    return torch.tensor(rgb, dtype=torch.float32) / 127.5 - 1.0


def save(img, path, **kw):
    img.save(path, **kw)
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    return d


def test_folder_sorted_modes_and_skips(folder):
    save(solid((255, 0, 0)), folder / "b_red.png")
    save(solid((0, 0, 255)), folder / "a_blue.jpg", quality=100)
    save(solid(128, mode="L"), folder / "c_gray.png")
    pal = solid((0, 200, 0)).convert("P")
    save(pal, folder / "d_pal.gif")
    (folder / "a_blue.txt").write_text("a caption")
    (folder / ".DS_Store").write_bytes(b"\0\1junk")
    (folder / "._b_red.png").write_bytes(b"AppleDouble resource fork")
    (folder / "sub").mkdir()
    save(solid((1, 2, 3)), folder / "sub" / "ignored.png")

    out = load_image_folder(folder, 16)
    assert out.count == 4
    assert out.pixels.shape == (4, 3, 16, 16) and out.pixels.dtype == torch.float32
    assert out.pixels.min() >= -1.0 and out.pixels.max() <= 1.0
    expected = [(0, 0, 255), (255, 0, 0), (128, 128, 128), (0, 200, 0)]  # sorted names
    for row, rgb in zip(out.pixels, expected, strict=True):
        mean = row.mean(dim=(1, 2))
        assert torch.allclose(mean, to_unit(rgb), atol=3 * TOL), (mean, rgb)
    joined = " ".join(out.notes)
    for skipped in ("a_blue.txt", ".DS_Store", "._b_red.png", "sub"):
        assert skipped in joined
    assert out.warnings == []


def test_exif_orientation_is_applied(folder):
    # Stored landscape 64x32: left half red, right half blue. EXIF 6 = display rotated 90 deg
    # clockwise -> portrait 32x64 with red on top. The centred square then has red above blue.
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, :32] = (255, 0, 0)
    arr[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    save(Image.fromarray(arr), folder / "rot.png", exif=exif.tobytes())
    save(solid((0, 255, 0)), folder / "z.png")
    px = load_image_folder(folder, 32).pixels[0]
    top, bottom = px[:, 2, :].mean(dim=1), px[:, -3, :].mean(dim=1)
    assert torch.allclose(top, to_unit((255, 0, 0)), atol=3 * TOL)
    assert torch.allclose(bottom, to_unit((0, 0, 255)), atol=3 * TOL)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_canonical_decode_of_each_image_kind(folder, kind):
    """The one decode (ComfyUI Load Image's): alpha ignored (stored colour kept, never composited
    over white), 16-bit gray clipped to 255, 32-bit integers / 255, palette colours looked up
    (transparent index too), CMYK by Pillow's formula, EXIF orientation applied. The old decode
    composited alpha over white and rescaled 16-bit, so the same files got another id than in
    ComfyUI (a second budget)."""
    path, expected = KINDS[kind](folder, "x", 7)
    with Image.open(path) as im:
        rgb, lost = decode_rgb(im)
    got = np.asarray(rgb)
    assert got.shape == expected.shape and got.dtype == np.uint8
    tol = 1 if kind == "cmyk" else 0  # Pillow's integer CMYK arithmetic vs our rounding
    assert int(np.abs(got.astype(int) - expected.astype(int)).max()) <= tol
    want_lost = {"rgba": ["transparency"], "la": ["transparency"], "palette": ["transparency"]}
    want_lost |= {"gray16": ["clipped"], "int32": ["clipped"]}
    assert lost == want_lost.get(kind, [])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_same_files_same_id_and_pixels_as_comfyui_tensors(folder, kind):
    """Files loaded by the CLI decode and the same pictures handed over as ComfyUI IMAGE tensors
    (8-bit values / 255, any sizes, as Load Image outputs them) get one dataset id and the very
    same training pixels."""
    expected = [KINDS[kind](folder, f"{kind}{i}", 10 + i)[1] for i in range(2)]
    from_files = load_image_folder(folder, 16)
    tensors = [torch.from_numpy(e.astype(np.float32) / 255.0) for e in expected]
    from_comfy = load_images(tensors, 16)
    assert from_files.dataset_id == from_comfy.dataset_id
    assert from_files.digests == [pixel_digest(e) for e in expected]
    assert torch.equal(from_files.pixels, from_comfy.pixels)


def test_lossy_kinds_are_named_in_warnings(folder):
    KINDS["gray16"](folder, "deep", 1)
    KINDS["rgba"](folder, "see_through", 2)
    save(solid((1, 2, 3)), folder / "plain.png")
    out = load_image_folder(folder, 16)
    clipped = [w for w in out.warnings if "clipped" in w]
    transparent = [w for w in out.warnings if "transparency" in w]
    assert len(clipped) == 1 and "deep.png" in clipped[0] and "plain" not in clipped[0]
    assert len(transparent) == 1 and "see_through.png" in transparent[0]
    # an opaque RGBA file (alpha 255 everywhere) is not reported
    save(solid((9, 9, 9, 255), mode="RGBA"), folder / "see_through.png")
    assert not [w for w in load_image_folder(folder, 16).warnings if "transparency" in w]


def test_corrupt_files_are_all_named(folder):
    save(solid((255, 0, 0)), folder / "ok1.png")
    save(solid((0, 255, 0)), folder / "ok2.png")
    (folder / "garbage.png").write_bytes(b"this is not a png at all")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG", quality=95
    )
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(DpaggError) as e:
        load_image_folder(folder, 16)
    msg = str(e.value)
    assert "garbage.png" in msg and "truncated.jpg" in msg and "2 file(s)" in msg
    assert "ok1.png" not in msg


def test_zero_and_one_image_are_errors(folder):
    (folder / "notes.txt").write_text("x")
    with pytest.raises(DpaggError, match="no images found"):
        load_image_folder(folder, 16)
    save(solid((9, 9, 9)), folder / "only.png")
    with pytest.raises(DpaggError, match="at least 2"):
        load_image_folder(folder, 16)
    with pytest.raises(DpaggError, match="does not exist"):
        load_image_folder(folder / "nope", 16)
    with pytest.raises(DpaggError, match="is a file"):
        load_image_folder(folder / "only.png", 16)


@pytest.mark.parametrize("bad", [0, 30, -8, 12.0, True, "512"])
def test_resolution_validated(folder, bad):
    with pytest.raises(DpaggError, match="resolution"):
        load_image_folder(folder, bad)


def test_duplicates_warn(folder, caplog):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 20, 3), np.uint8))
    save(img, folder / "a.png")
    shutil.copy(folder / "a.png", folder / "b.png")  # same bytes
    save(img, folder / "c.png", compress_level=0)  # other bytes, same pixels
    save(solid((1, 2, 3), (20, 20)), folder / "d.png")
    with caplog.at_level(logging.WARNING, logger="dpagg_core.io.images"):
        out = load_image_folder(folder, 16)
    assert (folder / "a.png").read_bytes() != (folder / "c.png").read_bytes()
    dup = [w for w in out.warnings if w.startswith("duplicate")]
    assert len(dup) == 2
    assert "b.png and a.png have identical file content" in dup[0]
    assert "c.png and a.png have identical pixels" in dup[1]
    assert sum("duplicate image" in r.getMessage() for r in caplog.records) == 2
    assert out.count == 4  # duplicates are kept: n is what the user gave


def test_small_images_upscaled_with_warning(folder):
    save(solid((10, 20, 30), (6, 9)), folder / "tiny.png")
    save(solid((40, 50, 60), (64, 64)), folder / "big.png")
    out = load_image_folder(folder, 32)
    assert out.pixels.shape == (2, 3, 32, 32)
    assert len(out.warnings) == 1 and "tiny.png (6x9)" in out.warnings[0]
    assert torch.allclose(out.pixels[1].mean(dim=(1, 2)), to_unit((10, 20, 30)), atol=TOL)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming a huge image but holding almost no pixel data (a bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)  # far too little data for the claimed size
    sig = b"\x89PNG\r\n\x1a\n"
    return sig + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_refused_before_decoding(folder):
    save(solid((1, 1, 1)), folder / "a.png")
    (folder / "bomb.png").write_bytes(_png_header_only(5000, 5000))
    # 25 MP over a 10 MP limit: refused from the header (decoding would fail differently).
    with pytest.raises(DpaggError, match=r"bomb.png: 5000x5000 .*safety limit of 10 megapixels"):
        load_image_folder(folder, 16, max_pixels=10_000_000)
    (folder / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))  # over Pillow's limit
    with pytest.raises(DpaggError, match="bomb.png"):
        load_image_folder(folder, 16)


def test_dataset_id_is_keyed_hash_of_decoded_pixels(folder, tmp_path):
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        save(solid(c), folder / f"{i}.png")
    raw = [(folder / f"{i}.png").read_bytes() for i in range(3)]
    first = load_image_folder(folder, 16)
    key = identity_key()  # the default ledger ($DPAGG_LEDGER, set per test by conftest)
    assert first.dataset_id.startswith("ds-") and first.dataset_id != dataset_id_for(raw, key=key)
    assert first.dataset_id == dataset_id_for(first.digests, key=key)
    (folder / "1.png").unlink()  # the same pixels re-encoded (BMP) keep the id
    solid((0, 255, 0)).save(folder / "1.bmp")
    assert load_image_folder(folder, 16).dataset_id == first.dataset_id
    (folder / "0.png").rename(folder / "z.png")  # renaming / reordering keeps the id
    assert load_image_folder(folder, 16).dataset_id == first.dataset_id
    save(solid((255, 0, 1)), folder / "z.png")  # editing an image changes it
    assert load_image_folder(folder, 16).dataset_id != first.dataset_id


def test_dataset_id_ignores_names_listing_order_sizes_and_resolution(tmp_path):
    """Mixed-size pictures: renamed (so the sorted order changes), re-listed in another folder,
    loaded at another resolution, or handed over as the full-size tensors a ComfyUI loader
    outputs: one id. The id comes from the full-size pictures, never from names, order or a
    resize (ComfyUI's folder loader, which resized every image to the first file of an unsorted
    listing, gave renamed files a new id - a fresh budget)."""
    a = tmp_path / "a"
    paths = write_mixed_sizes(a)
    first = load_image_folder(a, 16)
    b = tmp_path / "b"
    b.mkdir()
    for i, p in enumerate(paths):  # reversed names: the first listed file is another one
        (b / f"{len(paths) - i:02d}_renamed{p.suffix}").write_bytes(p.read_bytes())
    again = load_image_folder(b, 32)
    assert again.dataset_id == first.dataset_id
    assert sorted(again.digests) == sorted(first.digests)
    assert again.digests != first.digests  # rows follow the (new) sorted names
    originals = [torch.from_numpy(np.asarray(Image.open(p), np.float32) / 255) for p in paths]
    assert load_images(originals[::-1], 24).dataset_id == first.dataset_id
    # what an order-dependent "resize to the first image" did: other pixels, another set
    first_size = Image.open(paths[1]).size
    stretched = [Image.open(p).resize(first_size, Image.Resampling.LANCZOS) for p in paths]
    assert load_images(stretched, 16).dataset_id != first.dataset_id


def test_dataset_id_is_keyed_by_the_ledger_and_paths_resolve(folder, tmp_path, monkeypatch):
    """One ledger = one identity space: the id is keyed by the ledger file's own key; a path
    with ``~`` names the same ledger as its absolute form (never a folder called ``~``)."""
    save(solid((1, 2, 3)), folder / "a.png")
    save(solid((4, 5, 6)), folder / "b.png")
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    one = load_image_folder(folder, 16, ledger="~/one.sqlite")
    assert (home / "one.sqlite").is_file() and not (elsewhere / "~").exists()
    assert load_image_folder(folder, 16, ledger=home / "one.sqlite").dataset_id == one.dataset_id
    assert one.dataset_id == dataset_id_for(one.digests, key=identity_key(home / "one.sqlite"))
    other = load_image_folder(folder, 16, ledger=home / "two.sqlite")
    assert other.dataset_id != one.dataset_id and other.digests == one.digests
    monkeypatch.setenv("DPAGG_LEDGER", "~/one.sqlite")  # the default ledger, from the env
    assert load_image_folder(folder, 16).dataset_id == one.dataset_id
    assert not (elsewhere / "~").exists()
    monkeypatch.chdir(folder.parent)  # relative paths are made absolute the same way
    assert load_images([solid((1, 2, 3)), solid((4, 5, 6))], 8).dataset_id == one.dataset_id
    assert load_image_folder(folder.name, 16).dataset_id == one.dataset_id
    # an explicit dataset_id never touches a ledger
    monkeypatch.setenv("DPAGG_LEDGER", str(tmp_path / "never.sqlite"))
    assert load_image_folder(folder, 16, dataset_id="ds-mine").dataset_id == "ds-mine"
    assert not (tmp_path / "never.sqlite").exists()


def test_loaded_images_repr_shows_no_private_values(folder):
    rng = np.random.default_rng(5)
    for i in range(2):
        save(Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8)), folder / f"{i}.png")
    out = load_image_folder(folder, 8)
    text = repr(out)
    assert "tensor" not in text and "digests" not in text and "pixels" not in text
    assert out.dataset_id in text and out.resolution == 8
    for d in out.digests:
        assert d.hex()[:12] not in text and repr(d)[:12] not in text


def test_each_image_processed_independently(tmp_path):
    rng = np.random.default_rng(2)
    x, y, z = (Image.fromarray(rng.integers(0, 255, (30, 50, 3), np.uint8)) for _ in range(3))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save(x, a / "x.png"), save(y, a / "y.png")
    save(x, b / "x.png"), save(z, b / "y.png")
    assert torch.equal(load_image_folder(a, 24).pixels[0], load_image_folder(b, 24).pixels[0])


def test_in_memory_inputs_match_folder(folder):
    rng = np.random.default_rng(3)
    arrays = [rng.integers(0, 255, (20, 28, 3), np.uint8) for _ in range(3)]
    for i, arr in enumerate(arrays):
        save(Image.fromarray(arr), folder / f"{i}.png")
    from_folder = load_image_folder(folder, 16)
    from_pil = load_images([Image.fromarray(a) for a in arrays], 16)
    nhwc = torch.from_numpy(np.stack(arrays)).float() / 255.0
    from_nhwc = load_images(nhwc, 16)
    from_nchw = load_image_folder(nhwc.permute(0, 3, 1, 2), 16)
    assert torch.equal(from_folder.pixels, from_pil.pixels)
    assert torch.equal(from_folder.pixels, from_nhwc.pixels)
    assert torch.equal(from_folder.pixels, from_nchw.pixels)
    # One budget per collection: files, PIL images and ComfyUI tensors share the id.
    assert from_folder.dataset_id == from_pil.dataset_id == from_nhwc.dataset_id
    assert from_nhwc.dataset_id == from_nchw.dataset_id
    assert from_pil.dataset_id.startswith("ds-")
    assert load_images(nhwc, 16, dataset_id="ds-mine").dataset_id == "ds-mine"
    with pytest.raises(DpaggError, match=r"\[0, 1\]"):
        load_images(nhwc * 2 - 1, 16)
    with pytest.raises(DpaggError, match="channel"):
        load_images(torch.rand(2, 5, 8, 8), 16)
    with pytest.raises(DpaggError, match="not a PIL image"):
        load_images([Image.fromarray(arrays[0]), "x.png"], 16)


@settings(max_examples=30, deadline=None)
@given(
    w=st.integers(1, 90),
    h=st.integers(1, 90),
    mode=st.sampled_from(["RGB", "RGBA", "L", "P", "CMYK", "I;16"]),
    value=st.integers(0, 255),
    res=st.sampled_from([8, 16, 24]),
)
def test_solid_images_stay_solid(w, h, mode, value, res):
    """Any size and mode: a uniform gray image comes out as that gray, in shape [2, 3, res, res]."""
    if mode == "I;16":  # 16-bit values are taken as they are (clipped at 255; none here)
        img = Image.fromarray(np.full((h, w), value, np.uint16))
    elif mode == "CMYK":
        img = Image.new("CMYK", (w, h), (0, 0, 0, 255 - value))
    elif mode == "P":
        img = Image.new("RGB", (w, h), (value,) * 3).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = Image.new("RGB", (w, h), (value,) * 3).convert(mode)
    out = load_images([img, Image.new("RGB", (4, 4))], res)
    assert out.pixels.shape == (2, 3, res, res)
    assert torch.allclose(
        out.pixels[0], torch.full_like(out.pixels[0], value / 127.5 - 1), atol=TOL
    )
