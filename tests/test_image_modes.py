"""Images of every mode and bit depth load as upright 8-bit RGB (`vd_jax.image_io`), and the
training-data builder stores the same pixels. Files are written with Pillow into tmp dirs."""
import io

import numpy as np
import pytest
from PIL import Image

from vd_jax.errors import InputError
from vd_jax.image_io import ALPHA_BACKGROUND, to_uint8_rgb, clip_preprocess, load_image, pil_to_rgb

H, W = 48, 256
RAMP8 = np.tile(np.arange(256, dtype=np.uint8)[None], (H, 1))           # (48, 256) 0..255
# a 16-bit ramp that is not an exact multiple of 257 (the scaling must round, not truncate)
RAMP16 = np.tile(np.linspace(0, 65535, W).round().astype(np.uint16)[None], (H, 1))


def _grey3(a):
    return np.repeat(a[..., None], 3, axis=-1)


def _smooth_rgb(h=64, w=96, seed=0):
    """Smooth colours (JPEG error stays small), distinct per seed."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR))


def _psnr(x, y):
    mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


def _composite(rgb, alpha):
    """Over white in float: what `Image.alpha_composite` computes up to integer rounding."""
    a = alpha.astype(np.float64)[..., None] / 255
    return rgb.astype(np.float64) * a + np.asarray(ALPHA_BACKGROUND, np.float64) * (1 - a)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / 'ramp16.png'
    Image.fromarray(RAMP8.astype(np.uint16) * 257).save(p)
    with Image.open(p) as im:
        assert im.mode == 'I;16'
        naive = np.asarray(im.convert('RGB')).mean()   # what convert('RGB') gives: clipped
    assert naive > 250
    got = load_image(p)
    assert got.shape == (H, W, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, _grey3(RAMP8))       # v * 257 -> v exactly
    # a ramp between the multiples of 257: rounded to the nearest 8-bit level
    q = tmp_path / 'ramp16b.png'
    Image.fromarray(RAMP16).save(q)
    want = np.rint(RAMP16 / 257.0)
    got = load_image(q)
    np.testing.assert_array_equal(got, _grey3(want.astype(np.uint8)))
    assert abs(got.mean() - RAMP8.mean()) < 1


@pytest.mark.parametrize('mode,fmt', [('I;16B', 'TIFF'), ('I;16', 'TIFF'), ('I', 'TIFF'),
                                      ('I', 'PNG-as-I')])
def test_other_16_and_32_bit_integer_modes(tmp_path, mode, fmt):
    a = RAMP8.astype(np.uint32) * 257
    if fmt == 'PNG-as-I':  # a PIL 'I' image in memory (how older Pillow opened 16-bit PNGs)
        im = Image.fromarray(a.astype(np.int32))
        assert im.mode == 'I'
        np.testing.assert_array_equal(pil_to_rgb(im), _grey3(RAMP8))
        return
    p = tmp_path / f'ramp_{mode.replace(";", "_")}.tif'
    if mode == 'I':
        Image.fromarray(a.astype(np.int32)).save(p)
    elif mode == 'I;16B':
        Image.frombytes('I;16B', (W, H), a.astype('>u2').tobytes()).save(p)
    else:
        Image.fromarray(a.astype(np.uint16)).save(p)
    with Image.open(p) as im:
        assert im.mode == mode
    np.testing.assert_array_equal(load_image(p), _grey3(RAMP8))


def test_float_grey_both_conventions(tmp_path):
    unit = tmp_path / 'unit.tif'
    Image.fromarray(RAMP8.astype(np.float32) / 255).save(unit)    # [0, 1]
    byte = tmp_path / 'byte.tif'
    Image.fromarray(RAMP8.astype(np.float32)).save(byte)          # 0..255
    for p in (unit, byte):
        with Image.open(p) as im:
            assert im.mode == 'F'
        np.testing.assert_array_equal(load_image(p), _grey3(RAMP8))


def test_bilevel_and_grey(tmp_path):
    bits = (RAMP8 >= 128)
    p = tmp_path / 'bits.png'
    Image.fromarray(bits).save(p)
    with Image.open(p) as im:
        assert im.mode == '1'
    np.testing.assert_array_equal(load_image(p), _grey3(bits.astype(np.uint8) * 255))
    q = tmp_path / 'grey.png'
    Image.fromarray(RAMP8).save(q)
    np.testing.assert_array_equal(load_image(q), _grey3(RAMP8))


def test_alpha_is_composited_over_white(tmp_path):
    rgb = _smooth_rgb(H, W)
    alpha = RAMP8.copy()                                  # 0 (transparent) .. 255 (opaque)
    p = tmp_path / 'rgba.png'
    Image.fromarray(np.dstack([rgb, alpha])).save(p)
    got = load_image(p).astype(np.float64)
    assert np.abs(got - _composite(rgb, alpha)).max() <= 1   # integer rounding
    np.testing.assert_array_equal(got[:, 0], 255.)           # fully transparent: white
    np.testing.assert_array_equal(got[:, -1], rgb[:, -1])    # opaque: the colour itself
    grey = RAMP8[:, ::-1].copy()
    q = tmp_path / 'la.png'
    Image.fromarray(np.dstack([grey, alpha]), mode='LA').save(q)
    with Image.open(q) as im:
        assert im.mode == 'LA'
    assert np.abs(load_image(q) - _composite(_grey3(grey), alpha)).max() <= 1


def test_palette_with_transparency(tmp_path):
    idx = (np.arange(H * W).reshape(H, W) // 7 % 4).astype(np.uint8)
    palette = [255, 0, 0, 0, 128, 0, 0, 0, 255, 10, 20, 30]
    im = Image.fromarray(idx, mode='P')
    im.putpalette(palette)
    p = tmp_path / 'pal.png'
    im.save(p, transparency=3)                      # index 3 fully transparent
    got = load_image(p)
    want = np.asarray(palette, np.uint8).reshape(4, 3)[idx]
    want[idx == 3] = ALPHA_BACKGROUND
    np.testing.assert_array_equal(got, want)
    # without transparency: the palette colours
    q = tmp_path / 'pal_opaque.png'
    im.save(q)
    np.testing.assert_array_equal(load_image(q), np.asarray(palette, np.uint8).reshape(4, 3)[idx])


def test_cmyk_jpeg_colours_match_the_rgb_source(tmp_path):
    rgb = _smooth_rgb(64, 96, seed=1)
    p = tmp_path / 'cmyk.jpg'
    Image.fromarray(rgb).convert('CMYK').save(p, quality=95)
    with Image.open(p) as im:
        assert im.mode == 'CMYK'
    got = load_image(p)
    assert got.shape == rgb.shape
    # q95 JPEG of smooth colours: 53 dB measured; a channel inversion or a wrong conversion
    # is far below 15 dB
    assert _psnr(got, rgb) > 35, _psnr(got, rgb)


@pytest.mark.parametrize('orientation,rotate', [(6, 1), (8, -1), (3, 2)])
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation, rotate):
    upright = _smooth_rgb(64, 96, seed=2)                  # landscape, asymmetric
    stored = np.ascontiguousarray(np.rot90(upright, k=rotate))  # how the camera wrote it
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f'rot{orientation}.jpg'
    Image.fromarray(stored).save(p, quality=95, exif=exif)
    got = load_image(p)
    assert got.shape == upright.shape
    assert _psnr(got, upright) > 35, _psnr(got, upright)  # measured 43 dB; unrotated: shape or ~12 dB


def test_array_and_pil_inputs_scale_the_same(tmp_path):
    im16 = Image.fromarray(RAMP8.astype(np.uint16) * 257)
    np.testing.assert_array_equal(to_uint8_rgb(im16, 0), _grey3(RAMP8))
    np.testing.assert_array_equal(to_uint8_rgb(RAMP8.astype(np.uint16) * 257, 0), _grey3(RAMP8))
    rgba = Image.fromarray(np.dstack([_smooth_rgb(H, W), np.zeros((H, W), np.uint8)]))
    np.testing.assert_array_equal(to_uint8_rgb(rgba, 0), 255)
    # the CLIP input of a 16-bit image equals that of its 8-bit version
    np.testing.assert_array_equal(clip_preprocess(im16), clip_preprocess(_grey3(RAMP8)))
    with pytest.raises(ValueError, match='image 0: dtype int64 is not supported'):
        to_uint8_rgb(RAMP8.astype(np.int64), 0)


def test_unreadable_files_name_the_file(tmp_path):
    empty = tmp_path / 'empty.png'
    empty.write_bytes(b'')
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image at all')
    png = io.BytesIO()
    Image.fromarray(_smooth_rgb()).save(png, 'PNG')
    corrupt = tmp_path / 'corrupt.png'
    corrupt.write_bytes(png.getvalue()[:60] + bytes(200))    # valid header, garbage data
    folder = tmp_path / 'photos.png'
    folder.mkdir()
    for path, why in ((empty, 'empty'), (text, 'not an image'), (corrupt, 'cannot decode'),
                      (folder, 'is a folder')):
        with pytest.raises(InputError) as e:
            load_image(path)
        assert str(path) in str(e.value) and why in str(e.value), str(e.value)
        assert type(e.value) is InputError and e.value.__cause__ is None


def test_dataset_builder_stores_what_load_image_reads(tmp_path):
    """One conversion for training data and inference: `normalize_image_bytes` (the data
    builder's) re-encodes every non-RGB file to the pixels `load_image` returns."""
    from vd_jax.data import normalize_image_bytes
    files = {}
    files['g16.png'] = Image.fromarray(RAMP16)
    files['rgba.png'] = Image.fromarray(np.dstack([_smooth_rgb(H, W), RAMP8]))
    files['f.tif'] = Image.fromarray(RAMP8.astype(np.float32) / 255)
    files['cmyk.jpg'] = Image.fromarray(_smooth_rgb()).convert('CMYK')
    for name, im in files.items():
        p = tmp_path / name
        im.save(p)
        stored, size = normalize_image_bytes(p.read_bytes())
        with Image.open(io.BytesIO(stored)) as back:
            arr = np.asarray(back)
        np.testing.assert_array_equal(arr, load_image(p), err_msg=name)
        assert size == (arr.shape[1], arr.shape[0])
