from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rayad.data.dataset as dataset
from rayad.config import DataConfig
from rayad.data.dataset import cache_dir, load_split
from rayad.data.images import PILLOW_MAX_PIXELS, ImageTooLarge, image_size, load_image, load_mask
from rayad.data.manifest import build_manifest
from rayad.errors import ConfigError, DataError


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path)
    return path


def noise(seed: int, shape=(16, 16, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def square_mask(size: int = 16) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[2:6, 3:9] = 255
    return m


def make_mvtec(root: Path, n_train: int = 4) -> Path:
    base = root / "obj"
    for i in range(n_train):
        save(base / "train" / "good" / f"{i:03d}.png", noise(i))
    save(base / "test" / "good" / "000.png", noise(100))
    for i in range(2):
        save(base / "test" / "dent" / f"{i:03d}.png", noise(200 + i))
        save(base / "ground_truth" / "dent" / f"{i:03d}_mask.png", square_mask())
    return root


def manifest_of(root: Path):
    return build_manifest(root, "obj", DataConfig(val_fraction=0.0))


def test_load_image_rgb_resized(tmp_path):
    path = save(tmp_path / "a.png", noise(0, (24, 40, 3)))
    out = load_image(path, 32)
    assert out.dtype == np.uint8 and out.shape == (32, 32, 3)


def test_load_image_rgb_same_size_is_exact(tmp_path):
    array = noise(1)
    assert np.array_equal(load_image(save(tmp_path / "a.png", array), 16), array)
    assert np.array_equal(load_image((tmp_path / "a.png").read_bytes(), 16), array)


def test_load_image_grayscale_is_replicated(tmp_path):
    gray = noise(2, (16, 16))
    path = save(tmp_path / "g.png", gray)
    assert Image.open(path).mode == "L"
    out = load_image(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    for c in range(3):
        assert np.array_equal(out[..., c], gray)


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_one_conversion_rule_for_every_bit_depth(tmp_path):
    """The same picture stored with 8 or 16 bits, grayscale or RGB, PNG or TIFF, big- or little-endian, gives
    the same pixels (16-bit v -> v >> 8), so the same score."""
    rgb = noise(4, (16, 16, 3))
    gray = rgb[..., 0]
    deep = gray.astype(np.uint16) * 256 + 200  # the low byte is dropped
    as16 = {"gray png": save(tmp_path / "g16.png", deep)}
    assert Image.open(as16["gray png"]).mode == "I;16"
    buf = io.BytesIO()
    Image.frombytes("I;16B", (16, 16), deep.astype(">u2").tobytes()).save(buf, format="TIFF")
    as16["gray tiff big-endian"] = buf.getvalue()
    assert Image.open(io.BytesIO(as16["gray tiff big-endian"])).mode == "I;16B"
    for name, source in as16.items():
        out = load_image(source, 16)
        assert all(np.array_equal(out[..., c], gray) for c in range(3)), name
    assert np.array_equal(load_image(_png16_rgb(rgb.astype(np.uint16) * 257), 16), rgb)
    assert np.array_equal(load_image(save(tmp_path / "g8.png", gray), 16)[..., 0], gray)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_the_pixel_limit_is_rayads_up_to_pillows_own():
    over_pillows_warning = _png_header(10_000, 10_000)  # 100 M pixels: Pillow warns over 89.5 M
    with pytest.raises(ImageTooLarge, match="10000x10000 pixels is over the limit of 64,000,000"):
        load_image(over_pillows_warning, 16)
    with pytest.raises(DataError, match="not a readable image") as raised:  # allowed, then found to hold no pixels
        load_image(over_pillows_warning, 16, max_pixels=150_000_000)
    assert not isinstance(raised.value, ImageTooLarge)
    with pytest.raises(ImageTooLarge, match=f"over the pixel limit of {PILLOW_MAX_PIXELS:,}, Pillow's own"):
        load_image(_png_header(20_000, 20_000), 16, max_pixels=PILLOW_MAX_PIXELS)
    assert image_size(_png_header(9_000, 7_000)) == (9_000, 7_000)  # from the header: no pixels decoded
    with pytest.raises(ConfigError, match="data.max_pixels = 200000000 is out of range"):
        DataConfig(max_pixels=200_000_000)


def test_float_images_are_refused_by_name(tmp_path):
    path = tmp_path / "f.tiff"
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), mode="F").save(path)
    with pytest.raises(DataError, match="f.tiff: a 32-bit float image has no fixed conversion"):
        load_image(path, 16)


def _premultiplied_gray_tiff(gray: np.ndarray) -> bytes:
    """A grayscale TIFF with an opaque alpha marked premultiplied (ExtraSamples 1), which Pillow opens as
    mode "La" and cannot write itself: Pillow's LA TIFF with that tag changed."""
    buf = io.BytesIO()
    Image.fromarray(np.dstack([gray, np.full_like(gray, 255)]), "LA").save(buf, format="TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack_from("<H", data, ifd)[0], 12):
        if struct.unpack_from("<H", data, entry)[0] == 338:  # ExtraSamples: 2 (unassociated alpha) -> 1
            struct.pack_into("<H", data, entry + 8, 1)
    return bytes(data)


def test_premultiplied_gray_alpha_reads_as_its_gray(tmp_path):
    gray = noise(5, (16, 16))
    source = _premultiplied_gray_tiff(gray)
    assert Image.open(io.BytesIO(source)).mode == "La"  # Pillow converts it only to LA: every path crashed
    assert all(np.array_equal(load_image(source, 16)[..., c], gray) for c in range(3))


def test_load_image_rgba_drops_alpha(tmp_path):
    rgba = noise(3, (16, 16, 4))
    rgba[..., 3] = 0
    path = save(tmp_path / "t.png", rgba)
    assert Image.open(path).mode == "RGBA"
    out = load_image(path, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert np.array_equal(out, rgba[..., :3])


def test_load_image_random_bytes_names_file(tmp_path):
    path = tmp_path / "junk.png"
    path.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(DataError, match="not a readable image") as err:
        load_image(path, 16)
    assert str(path) in str(err.value)


def test_load_image_truncated_png_names_file(tmp_path):
    path = save(tmp_path / "cut.png", noise(4, (64, 64, 3)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as err:
        load_image(path, 16)
    assert str(path) in str(err.value)


def test_a_crafted_header_that_makes_pillow_raise_a_type_error_is_a_bad_image():
    """Pillow's IM reader turns this size into a TypeError: it reached Serve as a 500 and crashed predict. (IM is
    no longer a format rayad reads, so no reader sees it now.)"""
    header = b"Image type: RGB image\r\nImage size (x*y): 2.*24\r\nFile size (no of images): 1\r\n"
    crafted = header + bytes(511 - len(header)) + b"\x1a" + bytes(range(256)) * 7
    with pytest.raises(DataError, match=r"^<bytes>: not a readable image \(rayad reads PNG"):
        load_image(crafted, 16)


def test_load_image_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_image(tmp_path / "gone.png", 16)


def test_load_mask_binarises_and_resizes(tmp_path):
    path = save(tmp_path / "m.png", square_mask())
    mask = load_mask(path, 16, expected_hw=(16, 16))
    assert mask.dtype == bool and np.array_equal(mask, square_mask() > 127)
    assert load_mask(path, 8).shape == (8, 8)


@pytest.mark.parametrize("mode", ["0/255", "0/1", "bilevel", "palette", "16-bit", "dim colour",
                                  "colour+opaque alpha"])
def test_every_nonzero_mask_pixel_is_a_defect_however_the_mask_is_stored(tmp_path, mode):
    """VisA's original masks hold 0/1: read as 0/255 masks are (over 127), they were empty, silently. A colour
    mask's (1, 0, 0) is a defect too (grayscale rounds it to 0); its alpha channel is no defect."""
    defect = square_mask() > 127
    colour = np.zeros((*defect.shape, 4), np.uint8)
    colour[defect, 0], colour[..., 3] = 1, 255
    image = {"0/255": lambda: Image.fromarray(defect.astype(np.uint8) * 255),
             "0/1": lambda: Image.fromarray(defect.astype(np.uint8)),
             "bilevel": lambda: Image.fromarray(defect),
             "palette": lambda: _palette(defect),
             "16-bit": lambda: Image.fromarray(defect.astype(np.uint16) * 300),
             "dim colour": lambda: Image.fromarray(colour[..., :3]),
             "colour+opaque alpha": lambda: Image.fromarray(colour)}[mode]()
    image.save(tmp_path / "m.png")
    assert np.array_equal(load_mask(tmp_path / "m.png", 16), defect)


def _palette(defect: np.ndarray) -> Image.Image:
    """Index 0 white, index 1 a dark red: the defect's colour is darker than the background's."""
    image = Image.fromarray(defect.astype(np.uint8), mode="P")
    image.putpalette([255, 255, 255, 60, 0, 0] + [0] * 762)
    return image


def test_load_mask_wrong_size_raises(tmp_path):
    path = save(tmp_path / "m.png", square_mask(16))
    with pytest.raises(DataError, match="mask is 16x16 but its image is 24x20") as err:
        load_mask(path, 16, expected_hw=(20, 24))
    assert str(path) in str(err.value)


def test_load_split_shapes(tmp_path):
    manifest = manifest_of(make_mvtec(tmp_path))
    train = load_split(manifest, "train", 8)
    assert train.images.shape == (4, 8, 8, 3) and train.images.dtype == np.uint8
    assert train.masks is None
    assert train.tensor().shape == (4, 3, 8, 8)
    test = load_split(manifest, "test", 16)
    assert test.images.shape == (3, 16, 16, 3)
    assert test.masks.shape == (3, 16, 16) and test.masks.dtype == bool
    for image, mask, label, path in zip(test.images, test.masks, test.labels, test.rows["path"].to_pylist(),
                                        strict=True):
        assert np.array_equal(mask, square_mask() > 127) if label else not mask.any()
        assert np.array_equal(image, np.asarray(Image.open(path)))
    assert sorted(test.defect_types) == ["dent", "dent", "good"]


def test_load_split_empty_split(tmp_path):
    manifest = manifest_of(make_mvtec(tmp_path))
    val = load_split(manifest, "val", 16)
    assert val.images.shape == (0, 16, 16, 3) and val.rows.num_rows == 0


def test_load_split_second_call_uses_cache(tmp_path, monkeypatch):
    manifest = manifest_of(make_mvtec(tmp_path))
    cached_before = set(cache_dir().glob("*.npz"))
    first = load_split(manifest, "test", 16)
    assert len(set(cache_dir().glob("*.npz")) - cached_before) == 1

    def boom(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(dataset, "_decode_all", boom)
    second = load_split(manifest, "test", 16)
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.masks, second.masks)
    assert second.rows.equals(first.rows)
    with pytest.raises(AssertionError, match="decoded again"):
        load_split(manifest, "test", 24)


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"", lambda b: b"PK\x03\x04" + b[10:]])
def test_damaged_cache_file_is_decoded_again(tmp_path, damage):
    manifest = manifest_of(make_mvtec(tmp_path))
    before = set(cache_dir().glob("*.npz"))
    first = load_split(manifest, "test", 16)
    (path,) = set(cache_dir().glob("*.npz")) - before
    path.write_bytes(damage(path.read_bytes()))
    again = load_split(manifest, "test", 16)
    assert np.array_equal(first.images, again.images) and np.array_equal(first.masks, again.masks)
    assert np.load(path)["images"].shape == first.images.shape  # and the cache is written again


def test_load_split_cache_invalidated_by_changed_file(tmp_path, monkeypatch):
    manifest = manifest_of(make_mvtec(tmp_path))
    before = load_split(manifest, "train", 16)
    changed = Path(manifest["path"][0].as_py())
    index = before.rows["path"].to_pylist().index(str(changed))
    new = np.full((16, 16, 3), 7, np.uint8)
    save(changed, new)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    after = load_split(manifest, "train", 16)
    assert np.array_equal(after.images[index], new)
    assert not np.array_equal(before.images[index], new)
    others = [i for i in range(len(after.images)) if i != index]
    assert np.array_equal(after.images[others], before.images[others])


def make_bad_train(root: Path) -> tuple[Path, list[Path]]:
    make_mvtec(root, n_train=4)
    train = root / "obj" / "train" / "good"
    bad = [train / "bad_a.png", train / "bad_b.png"]
    bad[0].write_bytes(b"not an image at all")
    data = (train / "000.png").read_bytes()
    bad[1].write_bytes(data[: len(data) // 3])
    return root, bad


def test_bad_images_error_lists_all(tmp_path):
    root, bad = make_bad_train(tmp_path)
    with pytest.raises(DataError, match="2 bad image") as err:
        load_split(manifest_of(root), "train", 16, on_bad_image="error")
    for path in bad:
        assert str(path) in str(err.value)
    assert "on_bad_image=skip" in str(err.value)


def test_bad_images_skip_warns_and_keeps_good(tmp_path, caplog, monkeypatch):
    root, bad = make_bad_train(tmp_path)
    manifest = manifest_of(root)
    with caplog.at_level(logging.WARNING, logger="rayad.data.dataset"):
        result = load_split(manifest, "train", 16, on_bad_image="skip")
    assert all(str(path) in caplog.text for path in bad)
    assert result.images.shape == (4, 16, 16, 3)
    kept = result.rows["path"].to_pylist()
    assert sorted(Path(p).name for p in kept) == ["000.png", "001.png", "002.png", "003.png"]
    for image, path in zip(result.images, kept, strict=True):
        assert np.array_equal(image, np.asarray(Image.open(path)))
    monkeypatch.setattr(dataset, "_decode_all", lambda *a: pytest.fail("a split with bad images was decoded again"))
    cached = load_split(manifest, "train", 16, on_bad_image="skip")
    assert np.array_equal(cached.images, result.images) and cached.rows["path"].to_pylist() == kept


def test_mask_of_wrong_size_is_a_bad_image(tmp_path):
    make_mvtec(tmp_path)
    wrong = save(tmp_path / "obj" / "ground_truth" / "dent" / "001_mask.png", square_mask(20))
    with pytest.raises(DataError, match="1 bad image") as err:
        load_split(manifest_of(tmp_path), "test", 16)
    assert str(wrong) in str(err.value)


def test_error_mode_not_bypassed_by_cache_of_skip_mode(tmp_path):
    root, _ = make_bad_train(tmp_path)
    manifest = manifest_of(root)
    load_split(manifest, "train", 16, on_bad_image="skip")
    with pytest.raises(DataError):
        load_split(manifest, "train", 16, on_bad_image="error")


def test_all_bad_split_masks_consistent_after_cache(tmp_path):
    make_mvtec(tmp_path)
    for p in (tmp_path / "obj" / "test").rglob("*.png"):
        p.write_bytes(b"junk")
    manifest = manifest_of(tmp_path)
    first = load_split(manifest, "test", 16, on_bad_image="skip")
    second = load_split(manifest, "test", 16, on_bad_image="skip")
    assert first.masks.shape == second.masks.shape == (0, 16, 16)
    assert len(first.rows) == len(second.rows) == 0


def test_a_16_bit_image_decodes_without_copies_in_a_wide_type():
    """A 16-bit image went through int64 copies: 16 bytes a pixel that numpy allocated (25 in all), gigabytes for a
    small PNG of many pixels, in the Serve ingress too."""
    import tracemalloc

    pixels = np.arange(2000 * 1500, dtype=np.uint32).reshape(2000, 1500).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    tracemalloc.start()
    try:
        image = load_image(buffer.getvalue(), 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * pixels.size, f"{peak / pixels.size:.1f} bytes a pixel"  # 5 now
    high_bytes = Image.fromarray((pixels >> 8).astype(np.uint8))
    assert np.array_equal(image, np.asarray(high_bytes.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)))


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP", "GIF", "PPM", "ICO", "EPS"])
def test_only_the_formats_rayad_reads_are_decoded(kind):
    """Pillow opens dozens of formats, and EPS runs Ghostscript (where it is installed) on what a client uploads."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(buffer, format=kind)
    if kind in ("PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP"):  # MPO: many cameras' JPEGs
        assert load_image(buffer.getvalue(), 16).shape == (16, 16, 3)
        return
    with pytest.raises(DataError, match=r"^<bytes>: not a readable image \(rayad reads PNG, JPEG, BMP, TIFF and "):
        load_image(buffer.getvalue(), 16)


def test_a_16_bit_colour_mask_that_reads_empty_is_named_and_one_of_high_values_reads(tmp_path):
    """Pillow keeps a 16-bit colour PNG's high bytes: a 0/1 mask stored so would count no defect pixel."""
    pixels = np.zeros((8, 8, 3), np.uint16)
    pixels[2:5, 2:5] = 1
    (tmp_path / "low.png").write_bytes(_png16_rgb(pixels))
    with pytest.raises(DataError, match="low.png: a 16-bit colour PNG, which Pillow reads by its high bytes only"):
        load_mask(tmp_path / "low.png", 8)
    (tmp_path / "high.png").write_bytes(_png16_rgb(pixels * 65535))
    assert load_mask(tmp_path / "high.png", 8).sum() == 9
