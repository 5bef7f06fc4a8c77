"""Training and evaluation transforms on uint8 tensors: clips (T, C, H, W), images (C, H, W).

The training augmentations follow the original's distributions (docs/training.md sets them
side by side):

* Video clips: one random square crop shared by all frames, then ALPRO's temporally
  consistent RandAugment: 2 distinct ops, always applied, unsigned parameters of magnitude 5,
  the same ops with the same parameters on every frame.
* Images (pre-training's, shown as a pseudo-video): RandomResizedCrop (scale 0.5-1), a
  horizontal flip with probability 1/2, then BLIP's RandomAugment: 2 ops drawn with
  replacement, each applied with probability 1/2, geometric parameters of magnitude 7 with a
  random sign.

The ops are OpenCV's as the original calls them (bilinear affine warps with a grey border,
PIL-mimicking colour tables), written in torch. Every random choice comes from the `rng`
(a `random.Random`) the caller passes, drawn before any pixel is touched: `draw` returns
what a call will do. The transforms return uint8: the video encoder normalises on its
device (models/pixels.py).
"""
import math
import random

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

MAX_LEVEL = 10
FILL = [128, 128, 128]  # the warps' border colour (the same in every channel)
# Contrast's mean grey: OpenCV's BGR luma weights, which the original applies to RGB channels 0, 1, 2.
CONTRAST_WEIGHTS = (0.114, 0.587, 0.299)
SHARPNESS_CENTRE_WEIGHT = 5  # the smoothing kernel [[1,1,1],[1,5,1],[1,1,1]] / 13
SHARPNESS_KERNEL_SUM = 13

# Per-pixel ops run on this many frames at a time: their temporaries then stay in the CPU
# cache (a whole 32-frame 224 px clip's float copy is 19 MB), which makes them 1.5-2x faster.
FRAMES_PER_CHUNK = 4


def frame_chunks(clip):
    """A clip (T, C, H, W) in chunks of FRAMES_PER_CHUNK frames; an image (C, H, W) whole."""
    return clip.split(FRAMES_PER_CHUNK) if clip.dim() == 4 else [clip]


def in_frame_chunks(op):
    """`op` (frames, *args) -> frames applied chunk by chunk: the same output, for ops that
    treat each frame on its own."""
    def chunked(clip, *args):
        parts = [op(part, *args) for part in frame_chunks(clip)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    return chunked


def apply_tables(x, tables):
    """Map every pixel value v of frame f to tables[f][v] (tables: uint8 (frames, 256), or
    (1, 256) for one table for all). Unchanged when every table is the identity, as brightness's
    and contrast's are at factor 1 (magnitude 5)."""
    if torch.equal(tables, torch.arange(256, dtype=torch.uint8).expand_as(tables)):
        return x
    frames = x.reshape(-1, *x.shape[-3:]).numpy()
    out = np.empty_like(frames)
    for frame, table, frame_out in zip(frames, np.broadcast_to(tables.numpy(), (len(frames), 256)), out):
        np.take(table, frame, out=frame_out)  # numpy indexes by uint8 directly; torch needs int64 indices
    return torch.from_numpy(out).view(x.shape)


def to_uint8_truncating(values):
    """numpy's float -> uint8 cast as the original's tables use it: clip, then drop the fraction."""
    return values.clamp_(0, 255).to(torch.uint8)


def contrast(x, factor):
    """Per frame: v -> (v - mean) * factor + mean, mean the frame's weighted channel means.
    Computed in float64 in the original's order of operations, so the tables are its tables."""
    frames = x.reshape(-1, *x.shape[-3:]).numpy()
    # Exact integer sums (numpy's are several times faster than torch's here), then float64 means as numpy's.
    channel_sums = torch.from_numpy(frames.sum(axis=(-2, -1), dtype=np.int64))
    channel_means = channel_sums.double() / (x.shape[-1] * x.shape[-2])
    weighted = channel_means * torch.tensor(CONTRAST_WEIGHTS, dtype=torch.float64)
    mean = (weighted[:, 0] + weighted[:, 1] + weighted[:, 2]).unsqueeze(1)
    values = torch.arange(256, dtype=torch.float64)
    return apply_tables(x, to_uint8_truncating((values - mean) * factor + mean))


def brightness(x, factor):
    """v -> v * factor, in float32 as the original's table."""
    table = torch.arange(256, dtype=torch.float32) * torch.tensor(factor, dtype=torch.float32)
    return apply_tables(x, to_uint8_truncating(table).unsqueeze(0))


@in_frame_chunks
def _blend_with_smoothed(x, factor):
    # The 3x3 sum from shifted slices in int16 (exact: at most 13 * 255): much faster on CPU
    # than a convolution. sum / 13 never ends in .5, so the integer rounding is OpenCV's.
    image = x.to(torch.int16)
    rows = image[..., :-2, :] + image[..., 1:-1, :] + image[..., 2:, :]
    window_sum = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    window_sum.add_(image[..., 1:-1, 1:-1], alpha=SHARPNESS_CENTRE_WEIGHT - 1)
    degenerate = window_sum.mul_(2).add_(SHARPNESS_KERNEL_SUM).div_(2 * SHARPNESS_KERNEL_SUM, rounding_mode="floor")
    degenerate = degenerate.float()
    interior = x[..., 1:-1, 1:-1].float().sub_(degenerate).mul_(torch.tensor(factor, dtype=torch.float32))
    out = x.clone()
    out[..., 1:-1, 1:-1] = to_uint8_truncating(interior.add_(degenerate))
    return out


def sharpness(x, factor):
    """PIL-style sharpness: the interior (1-pixel border kept) becomes
    degenerate + factor * (x - degenerate), degenerate = x smoothed by
    [[1,1,1],[1,5,1],[1,1,1]] / 13 and rounded to uint8; the result is clipped to [0, 255]
    (the original's cast wraps instead) and truncated. Factor 1 returns x, as the original does."""
    return x if factor == 1.0 else _blend_with_smoothed(x, factor)


def invert_affine(forward):
    """The inverse of a 2x3 affine map ((a, b, c), (d, e, f)), as OpenCV's warpAffine takes it."""
    (a, b, c), (d, e, f) = forward
    det = a * e - b * d
    inverse_a, inverse_b, inverse_d, inverse_e = e / det, -b / det, -d / det, a / det
    return ((inverse_a, inverse_b, -(inverse_a * c + inverse_b * f)),
            (inverse_d, inverse_e, -(inverse_d * c + inverse_e * f)))


def warp_affine(x, forward):
    """OpenCV's warpAffine(x, forward, INTER_LINEAR, BORDER_CONSTANT grey): output(forward(p)) =
    x(p), pixel i at coordinate i, sampled bilinearly; a sample whose neighbours fall outside
    the image takes grey for them, i.e. bilinear sampling of (x - 128) with zero padding, + 128.
    The sample positions are computed once and shared by every frame and channel."""
    height, width = x.shape[-2:]
    (a, b, c), (d, e, f) = invert_affine(forward)
    ys = torch.arange(height, dtype=torch.float64).unsqueeze(1)
    xs = torch.arange(width, dtype=torch.float64).unsqueeze(0)
    source_x, source_y = a * xs + b * ys + c, d * xs + e * ys + f
    # grid_sample's align_corners=False coordinates: -1 and 1 are the outer edges of the image.
    grid = torch.stack(((2 * source_x + 1) / width - 1, (2 * source_y + 1) / height - 1), dim=-1)
    grid = grid.float().unsqueeze(0)
    return _sample_in_chunks(x, grid)


@in_frame_chunks
def _sample_in_chunks(x, grid):
    planes = x.reshape(1, -1, *x.shape[-2:]).float().sub_(FILL[0])
    sampled = nnf.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # A convex combination of values in [-128, 127] and 0: + 128 it rounds into [0, 255].
    return sampled.add_(FILL[0]).round_().to(torch.uint8).view(x.shape)


def shift(x, pixels, dim):
    """Integer translation of the content by `pixels` along `dim` with grey fill: what the
    bilinear warp gives for a whole-pixel offset, as a slice copy."""
    out = torch.full_like(x, FILL[0])
    kept = x.shape[dim] - abs(pixels)
    if kept > 0:
        out.narrow(dim, max(pixels, 0), kept).copy_(x.narrow(dim, max(-pixels, 0), kept))
    return out


def translate(dim):
    """output(x) = input(x + offset) along `dim` (content moves left/up for a positive offset)."""
    forward = {-1: lambda offset: ((1, 0, -offset), (0, 1, 0)),
               -2: lambda offset: ((1, 0, 0), (0, 1, -offset))}[dim]

    def op(x, offset):
        if offset == int(offset):  # the original's offsets at whole magnitudes: a slice copy, not a warp
            return shift(x, -int(offset), dim)
        return warp_affine(x, forward(offset))
    return op


def shear_x(x, factor):
    """Forward map x' = x + factor * y about the top-left corner."""
    return warp_affine(x, ((1, factor, 0), (0, 1, 0)))


def shear_y(x, factor):
    """Forward map y' = y + factor * x about the top-left corner."""
    return warp_affine(x, ((1, 0, 0), (factor, 1, 0)))


def rotation_matrix(degrees, height, width):
    """OpenCV's getRotationMatrix2D((W/2, H/2), degrees, 1): positive turns counter-clockwise on screen."""
    centre_x, centre_y = width / 2, height / 2
    alpha, beta = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return ((alpha, beta, (1 - alpha) * centre_x - beta * centre_y),
            (-beta, alpha, beta * centre_x + (1 - alpha) * centre_y))


def rotate(x, degrees):
    return warp_affine(x, rotation_matrix(degrees, *x.shape[-2:]))


def enhance_factor(magnitude):
    # The original's order of operations: exactly 1.0 at magnitude 5.
    return (magnitude / MAX_LEVEL) * 1.8 + 0.1


AUGMENT_OPS = {  # name -> op(frames, parameter)
    "identity": lambda x, parameter: x,
    "contrast": contrast,
    "brightness": brightness,
    "sharpness": sharpness,
    "shear_x": shear_x,
    "shear_y": shear_y,
    "translate_x": translate(-1),
    "translate_y": translate(-2),
    "rotate": rotate,
    "hflip": lambda x, parameter: x.flip(-1),
}
OP_PARAMETERS = {  # name -> its parameter at a magnitude, before any random sign
    "identity": lambda magnitude: None,
    "contrast": enhance_factor,
    "brightness": enhance_factor,
    "sharpness": enhance_factor,
    "shear_x": lambda magnitude: 0.3 * magnitude / MAX_LEVEL,
    "shear_y": lambda magnitude: 0.3 * magnitude / MAX_LEVEL,
    "translate_x": lambda magnitude: 10 * magnitude / MAX_LEVEL,  # pixels, whatever the image size
    "translate_y": lambda magnitude: 10 * magnitude / MAX_LEVEL,
    "rotate": lambda magnitude: 30 * magnitude / MAX_LEVEL,  # degrees
    "hflip": lambda magnitude: None,
}
VIDEO_OPS = tuple(AUGMENT_OPS)  # ALPRO's list, in its order
IMAGE_OPS = ("identity", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "rotate")
SIGNED_IMAGE_OPS = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate"}  # BLIP flips these half the time


def video_augment_plan(rng, num_ops=2, magnitude=5):
    """ALPRO's draw: `num_ops` distinct ops in random order, each always applied, unsigned."""
    return [(name, OP_PARAMETERS[name](magnitude)) for name in rng.sample(VIDEO_OPS, num_ops)]


def image_augment_plan(rng, num_ops=2, magnitude=7, apply_probability=0.5):
    """BLIP's draw: `num_ops` ops drawn with replacement, each applied with `apply_probability`,
    the geometric ones with a sign that is negative half the time. The plan lists the applied ones."""
    plan = []
    for name in rng.choices(IMAGE_OPS, k=num_ops):
        if rng.random() < apply_probability:
            parameter = OP_PARAMETERS[name](magnitude)
            if name in SIGNED_IMAGE_OPS and rng.random() < 0.5:
                parameter = -parameter
            plan.append((name, parameter))
    return plan


def apply_plan(x, plan):
    """Apply a plan's (name, parameter) ops in order, each to all frames at once."""
    for name, parameter in plan:
        x = AUGMENT_OPS[name](x, parameter)
    return x


def random_resized_crop_box(rng, height, width, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision RandomResizedCrop's box (top, left, box_height, box_width), drawn from `rng`:
    up to `attempts` draws of an area fraction in `scale` and a log-uniform aspect ratio in
    `ratio` until the box fits, else the central crop with the ratio clamped to `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        box_width = int(round(math.sqrt(target_area * aspect_ratio)))
        box_height = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < box_width <= width and 0 < box_height <= height:
            return rng.randint(0, height - box_height), rng.randint(0, width - box_width), box_height, box_width
    image_ratio = width / height
    if image_ratio < min(ratio):
        box_width, box_height = width, int(round(width / min(ratio)))
    elif image_ratio > max(ratio):
        box_width, box_height = int(round(height * max(ratio))), height
    else:
        box_width, box_height = width, height
    return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width


class VideoTrainTransform:
    """One random square crop shared by all frames, then 2 distinct ops of magnitude 5 applied
    identically to every frame (ALPRO's TemporalConsistentRandomAugment)."""

    def __init__(self, image_size, num_ops=2, magnitude=5):
        self.image_size, self.num_ops, self.magnitude = image_size, num_ops, magnitude

    def draw(self, rng, height, width):
        """(top, left, plan) for a clip of height x width (after any upscaling to image_size)."""
        top = rng.randint(0, height - self.image_size)
        left = rng.randint(0, width - self.image_size)
        return top, left, video_augment_plan(rng, self.num_ops, self.magnitude)

    def __call__(self, clip, rng=random):
        if min(clip.shape[-2:]) < self.image_size:
            clip = F.resize(clip, [self.image_size], antialias=True)
        top, left, plan = self.draw(rng, *clip.shape[-2:])
        clip = clip[..., top:top + self.image_size, left:left + self.image_size]
        return apply_plan(clip, plan)


class ImageTrainTransform:
    """Image (C, H, W) uint8 -> pseudo-video (num_frm, C, S, S): RandomResizedCrop, a flip with
    probability 1/2, then BLIP's RandomAugment (2 ops of magnitude 7, each applied with probability 1/2)."""

    def __init__(self, image_size, num_frm, scale=(0.5, 1.0), num_ops=2, magnitude=7):
        self.image_size, self.num_frm, self.scale = image_size, num_frm, scale
        self.num_ops, self.magnitude = num_ops, magnitude

    def draw(self, rng, height, width):
        """(crop box (top, left, height, width), flip or not, plan) for an image of height x width."""
        box = random_resized_crop_box(rng, height, width, self.scale)
        flip = rng.random() < 0.5
        return box, flip, image_augment_plan(rng, self.num_ops, self.magnitude)

    def __call__(self, image, rng=random):
        box, flip, plan = self.draw(rng, *image.shape[-2:])
        image = F.resized_crop(image, *box, [self.image_size, self.image_size],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        if flip:
            image = image.flip(-1)
        image = apply_plan(image, plan)
        return image.unsqueeze(0).expand(self.num_frm, -1, -1, -1).contiguous()


class EvalTransform:
    """Deterministic: resize to image_size (a no-op when decoded at that size)."""

    def __init__(self, image_size):
        self.image_size = image_size

    def __call__(self, clip):
        if tuple(clip.shape[-2:]) != (self.image_size, self.image_size):
            clip = F.resize(clip, [self.image_size, self.image_size], antialias=True)
        return clip
