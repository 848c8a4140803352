import numpy as np
import pytest
from PIL import Image

from crop_accel.images import MAX_IMAGE_PIXELS, ImageLoadError, load_rgb


def _solid(mode, colour, size=(20, 10)):
    return Image.new(mode, size, colour)


def test_webp_named_jpg_decodes(tmp_path):
    path = tmp_path / "photo.jpg"
    _solid("RGB", (10, 200, 30)).save(path, format="WEBP", lossless=True)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert image.getpixel((5, 5)) == (10, 200, 30)


def test_jpeg_named_png_decodes(tmp_path):
    path = tmp_path / "photo.png"
    _solid("RGB", (200, 30, 30)).save(path, format="JPEG", quality=95)
    assert load_rgb(path).size == (20, 10)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _solid("RGB", (90, 90, 90), size=(40, 20)).save(path, exif=exif)
    assert load_rgb(path).size == (20, 40)


def test_rgba_composited_on_white(tmp_path):
    path = tmp_path / "transparent.png"
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.getpixel((4, 4)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (255, 0, 0)


def test_palette_transparency_composited_on_white(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    image.save(path, transparency=0)
    loaded = load_rgb(path)
    assert loaded.getpixel((4, 4)) == (255, 255, 255)
    assert loaded.getpixel((1, 1)) == (0, 128, 0)


def test_grayscale_becomes_rgb(tmp_path):
    path = tmp_path / "gray.png"
    _solid("L", 77).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (77, 77, 77)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    _solid("CMYK", (0, 255, 255, 0)).save(path, quality=100)
    red, green, blue = load_rgb(path).getpixel((5, 5))
    assert red > 200
    assert green < 60
    assert blue < 60


def test_multi_frame_uses_first_frame(tmp_path):
    path = tmp_path / "frames.gif"
    first = _solid("RGB", (255, 0, 0))
    second = _solid("RGB", (0, 0, 255))
    first.save(path, save_all=True, append_images=[second])
    red, _, blue = load_rgb(path).getpixel((3, 3))
    assert red > 200
    assert blue < 60


def test_sixteen_bit_png_keeps_contrast(tmp_path):
    path = tmp_path / "deep.png"
    pixels = np.full((10, 10), 32768, dtype=np.uint16)
    pixels[0, 0] = 65535
    Image.fromarray(pixels).save(path)
    loaded = load_rgb(path)
    assert loaded.getpixel((5, 5))[0] == pytest.approx(127, abs=1)
    assert loaded.getpixel((0, 0))[0] == 255


def test_truncated_file_raises_load_error(tmp_path):
    path = tmp_path / "broken.jpg"
    full = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    path.write_bytes(full.read_bytes()[:300])
    with pytest.raises(ImageLoadError) as caught:
        load_rgb(path)
    assert caught.value.path == str(path)
    assert caught.value.reason


def test_text_file_raises_load_error(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("not an image")
    with pytest.raises(ImageLoadError, match="cannot identify"):
        load_rgb(path)


def test_decompression_bomb_rejected_from_header(tmp_path):
    path = tmp_path / "bomb.png"
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    # A 1-bit image keeps the file small while its header declares too many pixels.
    Image.new("1", (side, side)).save(path, optimize=True)
    with pytest.raises(ImageLoadError, match="above the limit"):
        load_rgb(path)


def test_min_side_downscales_without_upscaling(tmp_path):
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    _solid("RGB", (1, 2, 3), size=(800, 400)).save(big)
    _solid("RGB", (1, 2, 3), size=(60, 30)).save(small)
    assert load_rgb(big, min_side=100).size == (200, 100)
    assert load_rgb(small, min_side=100).size == (60, 30)
