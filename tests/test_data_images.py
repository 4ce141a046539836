"""Image preprocessing equals the PIL-based CLIPImageProcessor; bad files become bad samples with a reason."""

import os

import numpy as np
import pytest
from data_fixtures import dirty_dataset, save_image
from PIL import Image, ImageOps

from mm_plugin.data.config import ImagePreprocessConfig
from mm_plugin.data.errors import BadSample
from mm_plugin.data.images import ImageProcessor, resolve_image_path
from seeds import varied

pytestmark = pytest.mark.numeric


@pytest.fixture(scope="module")
def clip():
    """clip-vit-large-patch14-336's processor (its preprocessor_config values), PIL backend."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 resample=3, do_center_crop=True, do_normalize=True, do_rescale=True,
                                 do_resize=True, rescale_factor=1 / 255,
                                 image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711])


def original_llava(path, processor, pad=False):
    """What original LLaVA feeds the model: Image.open(path).convert('RGB') (+ expand2square), then the processor.

    A palette image's transparency survives convert('RGB') in ``info``; transformers 5's processor would
    then composite it onto white, the transformers 4 one LLaVA used did not. Dropping it keeps LLaVA's.
    """
    image = Image.open(path).convert("RGB")
    image.info.pop("transparency", None)
    if pad:
        background = tuple(int(x * 255) for x in processor.image_mean)
        width, height = image.size
        side = max(width, height)
        canvas = Image.new("RGB", (side, side), background)
        canvas.paste(image, ((side - width) // 2, (side - height) // 2))
        image = canvas
    return processor(image, return_tensors="np")["pixel_values"][0]


CASES = [  # (size, mode, format)
    ((500, 375), "RGB", "JPEG"), ((375, 500), "RGB", "JPEG"), ((336, 336), "RGB", "JPEG"),
    ((337, 1001), "RGB", "PNG"), ((120, 60), "RGB", "JPEG"),  # smaller than the crop: upscaled
    ((300, 200), "L", "JPEG"), ((260, 300), "RGBA", "PNG"), ((310, 240), "P", "PNG"),
    ((400, 350), "CMYK", "JPEG"), ((350, 420), "I;16", "PNG"), ((200, 280), "LA", "PNG"),
    ((400, 1300), "RGB", "JPEG"), ((1200, 500), "RGB", "JPEG"),  # Pillow 13: vertical pass first / not
]


@pytest.mark.parametrize("size,mode,fmt", CASES)
def test_equal_to_clip_image_processor(tmp_path, clip, size, mode, fmt):
    path = save_image(tmp_path / f"image.{fmt.lower()}", size, mode=mode, fmt=fmt)
    ours = ImageProcessor(ImagePreprocessConfig()).load(str(path))
    reference = original_llava(path, clip)
    assert ours.shape == (3, 336, 336) and ours.dtype.is_floating_point
    assert np.abs(ours.numpy() - reference).max() <= 1e-5


def test_fast_routes_are_on_and_used(tmp_path, monkeypatch):
    """The C resize and simplejpeg are built/installed and agree with this Pillow, and load() goes through
    them: with both routes forced off, the same file gives the same tensor by Pillow alone."""
    from mm_plugin.data import fast_image

    assert fast_image.resample_route_agrees() and fast_image.jpeg_route_agrees()
    path = save_image(tmp_path / "image.jpg", (700, 450), subsampling=2)
    processor = ImageProcessor(ImagePreprocessConfig())
    calls = []
    for name in ("decode_jpeg", "resize_crop_normalize"):
        original = getattr(fast_image, name)
        monkeypatch.setattr(fast_image, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    fast = processor.load(str(path))
    assert calls == ["decode_jpeg", "resize_crop_normalize"]
    monkeypatch.setattr(fast_image, "decode_jpeg", lambda data: None)
    monkeypatch.setattr(fast_image, "resize_crop_normalize", lambda *args: None)
    assert torch_equal(fast, processor.load(str(path)))


def torch_equal(a, b):
    return a.shape == b.shape and bool((a == b).all())


def test_c_resize_equals_pillow_on_random_shapes():
    """Resize + crop in C against Pillow's resize then crop, byte for byte, on shapes that take both of
    Pillow 13's pass orders, upscaling, and one dimension left unchanged."""
    from mm_plugin.data import fast_image

    rng = np.random.default_rng(varied(3))
    identity = np.tile(np.arange(256, dtype=np.float32), (3, 1))
    orders = set()
    for _ in range(60):
        width, height = (int(v) for v in rng.integers(8, 160, size=2))
        out_width = width if rng.random() < 0.15 else int(rng.integers(4, 200))
        out_height = int(rng.integers(4, 200))
        crop_width, crop_height = int(rng.integers(1, out_width + 1)), int(rng.integers(1, out_height + 1))
        left, top = int(rng.integers(0, out_width - crop_width + 1)), int(rng.integers(0, out_height - crop_height + 1))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = np.asarray(Image.fromarray(pixels).resize((out_width, out_height), Image.BICUBIC))
        expected = expected[top:top + crop_height, left:left + crop_width].transpose(2, 0, 1)
        got = fast_image.resize_crop_normalize(pixels, (out_width, out_height),
                                               (left, top, crop_width, crop_height), identity)
        assert np.array_equal(got, expected), (width, height, out_width, out_height, left, top)
        orders.add(fast_image.pillow_vertical_first(width, height, out_width, out_height))
    assert orders == {True, False} or not fast_image._PILLOW_MAY_RESIZE_VERTICALLY_FIRST


def test_c_resize_rejects_inconsistent_sizes():
    from mm_plugin.data import _resample

    table, out = np.zeros((3, 256), np.float32), np.zeros((3, 4, 4), np.float32)
    with pytest.raises(ValueError, match="src must hold"):
        _resample.resize_crop_normalize(b"\0" * 10, 4, 4, 4, 4, 0, 0, 4, 4, False, table, out)
    with pytest.raises(ValueError, match="inside the resized image"):
        _resample.resize_crop_normalize(b"\0" * 48, 4, 4, 4, 4, 1, 0, 4, 4, False, table, out)


@pytest.mark.parametrize("size", [(500, 300), (200, 420), (256, 256)])
def test_pad_mode_equals_llava_expand2square(tmp_path, clip, size):
    path = save_image(tmp_path / "image.jpg", size)
    ours = ImageProcessor(ImagePreprocessConfig(pad_to_square=True)).load(str(path))
    assert np.abs(ours.numpy() - original_llava(path, clip, pad=True)).max() <= 1e-5


def test_without_resize_small_images_are_zero_padded_like_the_processor(tmp_path, clip):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    path = save_image(tmp_path / "small.png", (200, 401), fmt="PNG")
    reference = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      do_resize=False)(Image.open(path).convert("RGB"), return_tensors="np")
    ours = ImageProcessor(ImagePreprocessConfig(do_resize=False)).load(str(path))
    assert np.abs(ours.numpy() - reference["pixel_values"][0]).max() <= 1e-5


def test_exif_rotation_is_off_by_default_and_optional(tmp_path):
    folder = dirty_dataset() / "images"
    path = str(folder / "00000/exif.jpg")
    config = dict(shortest_edge=56, crop_height=56, crop_width=56)
    plain = ImageProcessor(ImagePreprocessConfig(**config))
    rotated = ImageProcessor(ImagePreprocessConfig(exif_transpose=True, **config))
    raw = Image.open(path)
    assert raw.size == (72, 40)
    expected_plain = plain.preprocess(raw.convert("RGB"))
    expected_rotated = plain.preprocess(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert np.array_equal(plain.load(path).numpy(), expected_plain.numpy())
    assert np.array_equal(rotated.load(path).numpy(), expected_rotated.numpy())
    assert not np.array_equal(expected_plain.numpy(), expected_rotated.numpy())
    assert rotated.inspect(path)[0] == (40, 72)


def test_jpeg_draft_is_opt_in_and_close(tmp_path, clip):
    path = save_image(tmp_path / "big.jpg", (1400, 1000), quality=92)
    drafted = ImageProcessor(ImagePreprocessConfig(jpeg_draft=True)).load(str(path)).numpy()
    reference = original_llava(path, clip)
    assert drafted.shape == reference.shape
    assert 0 < np.abs(drafted - reference).mean() < 0.05


@pytest.mark.parametrize("name,reason", [
    ("00000/nowhere.jpg", "missing_image"),
    ("00000/empty.jpg", "empty_image_file"),
    ("00000/notes.jpg", "not_an_image"),
    ("00000/truncated.jpg", "corrupt_image"),
    ("00000/huge.jpg", "decompression_bomb"),
])
def test_bad_files_have_reasons(name, reason):
    folder = dirty_dataset() / "images"
    processor = ImageProcessor(ImagePreprocessConfig(max_image_pixels=100 * 100))
    with pytest.raises(BadSample) as caught:
        processor.load(str(folder / name))
    assert caught.value.reason == reason
    assert name.split("/")[-1] in str(caught.value)


def test_pillow_decompression_bomb_error_is_a_bad_sample(tmp_path, monkeypatch):
    path = save_image(tmp_path / "image.png", (64, 64), fmt="PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow itself refuses > 2x this at open()
    with pytest.raises(BadSample) as caught:
        ImageProcessor(ImagePreprocessConfig()).load(str(path))
    assert caught.value.reason == "decompression_bomb"


def test_image_paths_must_stay_inside_the_data_folder(tmp_path):
    folder = dirty_dataset() / "images"
    real = os.path.realpath(folder)
    assert resolve_image_path(str(folder), "00000/rgb.jpg") == os.path.join(real, "00000/rgb.jpg")
    os.symlink(folder / "00000/rgb.jpg", tmp_path / "inside-link.jpg")
    for unsafe in ("/etc/passwd", "../outside/secret.jpg", "00000/../../outside/secret.jpg", "00000/link.jpg"):
        with pytest.raises(BadSample) as caught:
            resolve_image_path(str(folder), unsafe)
        assert caught.value.reason == "unsafe_image_path", unsafe


def test_normalisation_table_is_exact_for_every_byte():
    config = ImagePreprocessConfig()
    table = ImageProcessor(config).table
    values = np.arange(256, dtype=np.uint8)
    rescaled = (values.astype(np.float64) * config.rescale_factor).astype(np.float32)
    for channel in range(3):
        expected = (rescaled - np.float32(config.image_mean[channel])) / np.float32(config.image_std[channel])
        assert np.array_equal(table[channel], expected.astype(np.float32))
