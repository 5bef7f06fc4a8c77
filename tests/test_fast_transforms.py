"""The augmentation ops equal plain definitions of the original's ops, and the uint8 hand-off
gives the same numbers as normalising in the loader."""
import math

import numpy as np
import pytest
import torch

from data.transforms import (AUGMENT_OPS, CONTRAST_WEIGHTS, FILL, FRAMES_PER_CHUNK, brightness, contrast, rotate,
                             sharpness, shear_x, shear_y, shift, warp_affine)
from models.pixels import MEAN, STD, normalize
from models.timesformer import TimeSformer

GREY = FILL[0]


def random_clip(*shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def bilinear_warp_definition(image, inverse):
    """Per pixel: sample `image` (C, H, W) at inverse(x, y), bilinear, grey outside (unrounded)."""
    channels, height, width = image.shape
    pixels = image.double()
    out = torch.empty(channels, height, width, dtype=torch.float64)
    for y in range(height):
        for x in range(width):
            source_x, source_y = inverse(x, y)
            left, top = math.floor(source_x), math.floor(source_y)
            total = torch.zeros(channels, dtype=torch.float64)
            for tap_y, weight_y in ((top, 1 - (source_y - top)), (top + 1, source_y - top)):
                for tap_x, weight_x in ((left, 1 - (source_x - left)), (left + 1, source_x - left)):
                    inside = 0 <= tap_x < width and 0 <= tap_y < height
                    value = pixels[:, tap_y, tap_x] if inside else torch.full((channels,), float(GREY))
                    total += weight_x * weight_y * value
            out[:, y, x] = total
    return out


def rotation_inverse(degrees, height, width):
    """Turning the output back by -degrees about (W/2, H/2), with y pointing down."""
    theta = math.radians(degrees)
    centre_x, centre_y = width / 2, height / 2

    def inverse(x, y):
        dx, dy = x - centre_x, y - centre_y
        return (centre_x + math.cos(theta) * dx - math.sin(theta) * dy,
                centre_y + math.sin(theta) * dx + math.cos(theta) * dy)
    return inverse


@pytest.mark.parametrize("name, parameter, inverse", [
    ("shear_x", 0.15, lambda x, y: (x - 0.15 * y, y)),
    ("shear_x", -0.21, lambda x, y: (x + 0.21 * y, y)),
    ("shear_y", 0.3, lambda x, y: (x, y - 0.3 * x)),
    ("translate_x", 2.5, lambda x, y: (x + 2.5, y)),
    ("translate_y", -1.25, lambda x, y: (x, y - 1.25)),
    ("rotate", 15.0, rotation_inverse(15.0, 9, 13)),
    ("rotate", -21.0, rotation_inverse(-21.0, 9, 13)),
])
def test_geometric_ops_equal_a_per_pixel_bilinear_warp_with_grey_border(name, parameter, inverse):
    clip = random_clip(2, 3, 9, 13)
    out = AUGMENT_OPS[name](clip, parameter)
    expected = torch.stack([bilinear_warp_definition(frame, inverse) for frame in clip])
    # A rounding of the exact value; float32 sample positions may break an exact .5 tie either way.
    assert (out.double() - expected).abs().max() <= 0.5 + 1e-4


def test_whole_pixel_shears_and_quarter_turns_move_pixels_where_the_forward_map_says():
    clip = random_clip(2, 3, 8, 8)
    sheared = shear_x(clip, 1.0)  # x' = x + y
    for y in range(8):
        assert torch.equal(sheared[..., y, y:], clip[..., y, :8 - y])
        assert (sheared[..., y, :y] == GREY).all()
    assert torch.equal(shear_y(clip, 1.0)[..., 3:, 3], clip[..., :5, 3])  # y' = y + x
    turned = rotate(clip, 90.0)  # about (4, 4), counter-clockwise on screen: (x, y) -> (y, 8 - x)
    for y in range(8):
        for x in range(1, 8):
            assert torch.equal(turned[..., 8 - x, y], clip[..., y, x])
    assert (turned[..., 0, :] == GREY).all()  # its source, column 8, is outside


def test_a_pixel_right_of_centre_turns_upwards():
    image = torch.full((3, 9, 9), GREY, dtype=torch.uint8)
    image[:, 4, 7] = 250  # centre (4.5, 4.5): pixel centres are at integer coordinates
    turned = rotate(image, 30.0)
    row, column = divmod(int(turned[0].int().sub(GREY).abs().argmax()), 9)
    assert row < 4 and column > 4  # up (smaller row) and still right of centre


def test_whole_pixel_translations_are_slice_shifts_with_grey_fill_and_equal_the_warp():
    clip = random_clip(3, 3, 12, 16)
    left = AUGMENT_OPS["translate_x"](clip, 5.0)  # output(x) = input(x + 5)
    assert torch.equal(left[..., :11], clip[..., 5:]) and (left[..., 11:] == GREY).all()
    down = AUGMENT_OPS["translate_y"](clip, -3.0)  # output(y) = input(y - 3)
    assert torch.equal(down[..., 3:, :], clip[..., :9, :]) and (down[..., :3, :] == GREY).all()
    assert torch.equal(left, warp_affine(clip, ((1, 0, -5.0), (0, 1, 0))))
    assert torch.equal(down, warp_affine(clip, ((1, 0, 0), (0, 1, 3.0))))
    assert (shift(clip, 20, -1) == GREY).all()


def test_hflip_mirrors_left_right():
    clip = random_clip(2, 3, 5, 7)
    assert torch.equal(AUGMENT_OPS["hflip"](clip, None), torch.from_numpy(clip.numpy()[..., ::-1].copy()))


def contrast_definition(frame, factor):
    """The original's table on an (H, W, C) array."""
    mean = np.sum(np.mean(frame, axis=(0, 1)) * np.array(CONTRAST_WEIGHTS))
    table = np.array([(value - mean) * factor + mean for value in range(256)]).clip(0, 255).astype(np.uint8)
    return table[frame]


def brightness_definition(frame, factor):
    return (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)[frame]


def sharpness_definition(frame, factor):
    """The original's blend on an (H, W, C) array, clipped before the cast."""
    kernel = np.ones((3, 3))
    kernel[1, 1] = 5
    padded = frame.astype(np.float64)
    height, width = frame.shape[:2]
    window = sum(kernel[dy, dx] * padded[dy:height - 2 + dy, dx:width - 2 + dx] for dy in range(3) for dx in range(3))
    degenerate = np.round(window / 13).astype(np.float32)
    out = frame.astype(np.float32)
    out[1:-1, 1:-1] = degenerate + factor * (out[1:-1, 1:-1] - degenerate)
    return out.clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("op, definition", [(contrast, contrast_definition), (brightness, brightness_definition),
                                            (sharpness, sharpness_definition)])
@pytest.mark.parametrize("factor", [0.1, 0.46, 1.36, 1.9])
def test_colour_ops_equal_the_originals_tables_frame_by_frame(op, definition, factor):
    clip = random_clip(2 * FRAMES_PER_CHUNK + 1, 3, 11, 14)
    clip[1] //= 4  # a dark frame: contrast's mean is per frame
    expected = np.stack([definition(frame, factor) for frame in clip.permute(0, 2, 3, 1).numpy()])
    out = op(clip, factor)
    assert torch.equal(out, torch.from_numpy(expected).permute(0, 3, 1, 2))
    assert torch.equal(op(clip[3], factor), out[3])  # an image is one frame


@pytest.mark.parametrize("op", [contrast, brightness, sharpness])
def test_colour_ops_are_the_identity_at_factor_one(op):
    for seed in range(20):
        clip = random_clip(2, 3, 10, 10, seed=seed)
        assert torch.equal(op(clip, 1.0), clip)


def test_sharpness_clips_instead_of_wrapping():
    image = torch.full((3, 5, 5), 200, dtype=torch.uint8)
    image[:, 2, 2] = 255
    image[:, 1, 1] = 0
    out = sharpness(image, 1.9)
    assert out[0, 2, 2] == 255 and out[0, 1, 1] == 0


def test_normalize_is_the_same_on_frames_and_on_encoder_batches():
    clips = torch.randint(0, 256, (2, 6, 3, 8, 8), dtype=torch.uint8)  # (B, T, C, H, W)
    per_clip = torch.stack([normalize(clip) for clip in clips])
    batch = normalize(clips.transpose(1, 2), channel_dim=1).transpose(1, 2)  # the encoder's (B, C, T, H, W)
    assert torch.equal(per_clip, batch)
    definition = clips[0].float().div(255).sub(torch.tensor(MEAN).view(3, 1, 1)).div(torch.tensor(STD).view(3, 1, 1))
    assert torch.equal(normalize(clips[0]), definition)


def test_the_encoder_normalises_uint8_clips_as_the_loaders_did():
    torch.manual_seed(0)
    encoder = TimeSformer(img_size=32, embed_dim=32, num_heads=2, num_frames=4, depth=2).eval()
    clips = torch.randint(0, 256, (2, 3, 4, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(encoder(clips), encoder(normalize(clips, channel_dim=1)))
