"""Image loading: real files written with Pillow, loaded by dpagg_core.images."""

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
from PIL import Image

from dpagg_core.embeddings import dataset_id_for
from dpagg_core.errors import DpaggError
from dpagg_core.images import load_image_folder, load_images

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


def test_alpha_is_composited_over_white_and_16_bit_is_rescaled(folder):
    rgba = np.zeros((16, 16, 4), np.uint8)  # fully transparent black -> white
    rgba[:8, :, :] = (255, 0, 0, 255)  # opaque red top half
    save(Image.fromarray(rgba, "RGBA"), folder / "a.png")
    gray16 = np.full((16, 16), 65535, np.uint16)
    gray16[8:] = 32896  # 32896 / 65535 * 255 = 128.0
    save(Image.fromarray(gray16), folder / "b.png")
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.paste(1, (0, 0, 16, 8))
    save(pal, folder / "c.png", transparency=0)  # index 0 transparent -> white
    out = load_image_folder(folder, 16).pixels
    white, red = to_unit((255, 255, 255)), to_unit((255, 0, 0))
    assert torch.allclose(out[0][:, 2, 8], red, atol=TOL)
    assert torch.allclose(out[0][:, 13, 8], white, atol=TOL)
    assert torch.allclose(out[1][:, 2, 8], white, atol=TOL)
    assert torch.allclose(out[1][:, 13, 8], to_unit((128, 128, 128)), atol=TOL)
    assert torch.allclose(out[2][:, 2, 8], to_unit((10, 20, 30)), atol=TOL)
    assert torch.allclose(out[2][:, 13, 8], white, atol=TOL)


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
    with caplog.at_level(logging.WARNING, logger="dpagg_core.images"):
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


def test_dataset_id_is_salted_hash_of_decoded_pixels(folder, tmp_path):
    for i, c in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        save(solid(c), folder / f"{i}.png")
    raw = [(folder / f"{i}.png").read_bytes() for i in range(3)]
    first = load_image_folder(folder, 16)
    assert first.dataset_id.startswith("ds-") and first.dataset_id != dataset_id_for(raw)
    (folder / "1.png").unlink()  # the same pixels re-encoded (BMP) keep the id
    solid((0, 255, 0)).save(folder / "1.bmp")
    assert load_image_folder(folder, 16).dataset_id == first.dataset_id
    (folder / "0.png").rename(folder / "z.png")  # renaming / reordering keeps the id
    assert load_image_folder(folder, 16).dataset_id == first.dataset_id
    save(solid((255, 0, 1)), folder / "z.png")  # editing an image changes it
    assert load_image_folder(folder, 16).dataset_id != first.dataset_id


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
    if mode == "I;16":
        img = Image.fromarray(np.full((h, w), value * 257, np.uint16))
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
