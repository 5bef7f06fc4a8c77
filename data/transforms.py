"""Clip transforms on uint8 tensors (T, C, H, W): every random choice is drawn once per clip
so all frames get the same augmentation. They return uint8 clips: the video encoder
normalises them (models/pixels.py) on its device."""
import random

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

MAX_MAGNITUDE = 10
FILL = [128, 128, 128]  # grey fill for pixels that geometric ops move in (the same in every channel)


# Elementwise ops run on this many frames at a time: their float temporaries then stay in the
# CPU cache (a whole 32-frame 224 px clip's are 19 MB each), which makes them 1.5-2x faster.
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


def _signed(scale, magnitude, rng):
    return rng.choice((-1, 1)) * scale * magnitude / MAX_MAGNITUDE


def _enhance(adjust):
    return lambda x, m, rng: adjust(x, 1 + _signed(0.9, m, rng))


def _affine(x, angle=0.0, shear=(0.0, 0.0)):
    """F.affine's nearest-neighbour warp with grey fill, computed once on a map of pixel
    positions and applied to every frame and channel as one gather: the same pixels as warping
    the clip itself (nearest copies values), without resampling T*C float planes."""
    height, width = x.shape[-2:]
    positions = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width)
    source = F.affine(positions, angle=angle, translate=[0, 0], scale=1.0, shear=list(shear), fill=-1.0).view(-1)
    planes = x.reshape(-1, height * width).numpy()  # numpy's take: several times faster than index_select
    warped = torch.from_numpy(np.take(planes, source.long().clamp_(min=0).numpy(), axis=1))
    return warped.masked_fill_(source < 0, FILL[0]).view(x.shape)


def shift(x, pixels, dim):
    """Integer translation along `dim` with grey fill: a slice copy, far cheaper than an affine warp."""
    out = torch.full_like(x, FILL[0])
    kept = x.shape[dim] - abs(pixels)
    if kept > 0:
        out.narrow(dim, max(pixels, 0), kept).copy_(x.narrow(dim, max(-pixels, 0), kept))
    return out


def _translate(dim):
    def op(x, m, rng):
        return shift(x, int(round(_signed(0.3, m, rng) * x.shape[dim])), dim)
    return op


@in_frame_chunks
def adjust_sharpness(x, factor):
    """PIL-style sharpness: blend with a copy smoothed by [[1,1,1],[1,5,1],[1,1,1]]/13 (borders
    untouched: the blend leaves them as they are). The 3x3 sum is built from shifted slices in
    int16 (exact: at most 13 * 255), much faster on CPU than torchvision's convolution."""
    image = x.to(torch.int16)
    rows = image[..., :-2, :] + image[..., 1:-1, :] + image[..., 2:, :]
    weighted = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = weighted.add_(image[..., 1:-1, 1:-1], alpha=4).float().div_(13)
    detail = x[..., 1:-1, 1:-1].float().sub_(smooth).mul_(factor)
    out = x.clone()
    out[..., 1:-1, 1:-1] = smooth.add_(detail).clamp_(0, 255).round_()
    return out


def _shear(axis):
    def op(x, m, rng):
        degrees = _signed(17.0, m, rng)  # about atan(0.3) at full magnitude
        return _affine(x, shear=(degrees, 0.0) if axis == 0 else (0.0, degrees))
    return op


AUGMENT_OPS = {
    "identity": lambda x, m, rng: x,
    "contrast": _enhance(in_frame_chunks(F.adjust_contrast)),  # its mean is per frame
    "brightness": _enhance(in_frame_chunks(F.adjust_brightness)),
    "sharpness": _enhance(adjust_sharpness),
    "shear_x": _shear(0),
    "shear_y": _shear(1),
    "translate_x": _translate(-1),
    "translate_y": _translate(-2),
    "rotate": lambda x, m, rng: _affine(x, angle=_signed(30.0, m, rng)),
    "hflip": lambda x, m, rng: F.horizontal_flip(x),
}
VIDEO_OPS = tuple(AUGMENT_OPS)
IMAGE_OPS = ("identity", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def rand_augment(clip, ops, num_ops, magnitude, rng=random):
    """Apply `num_ops` ops drawn from `ops`, each to the whole clip at once."""
    for name in rng.choices(ops, k=num_ops):
        clip = AUGMENT_OPS[name](clip, magnitude, rng)
    return clip


class VideoTrainTransform:
    """One random square crop shared by all frames, then 2 consistent ops of magnitude 5."""

    def __init__(self, image_size, num_ops=2, magnitude=5):
        self.image_size, self.num_ops, self.magnitude = image_size, num_ops, magnitude

    def __call__(self, clip, rng=random):
        height, width = clip.shape[-2:]
        if min(height, width) < self.image_size:
            clip = F.resize(clip, [self.image_size], antialias=True)
            height, width = clip.shape[-2:]
        top = rng.randint(0, height - self.image_size)
        left = rng.randint(0, width - self.image_size)
        clip = clip[..., top:top + self.image_size, left:left + self.image_size]
        return rand_augment(clip, VIDEO_OPS, self.num_ops, self.magnitude, rng)


class ImageTrainTransform:
    """Image (C, H, W) uint8 -> pseudo-video (num_frm, C, S, S): random resized crop, flip, 2 ops of magnitude 7."""

    def __init__(self, image_size, num_frm, scale=(0.5, 1.0), num_ops=2, magnitude=7):
        self.image_size, self.num_frm, self.scale = image_size, num_frm, scale
        self.num_ops, self.magnitude = num_ops, magnitude

    def __call__(self, image, rng=random):
        height, width = image.shape[-2:]
        side = min(height, width, int(round((rng.uniform(*self.scale) * height * width) ** 0.5)))
        top, left = rng.randint(0, height - side), rng.randint(0, width - side)
        image = F.resized_crop(image, top, left, side, side, [self.image_size, self.image_size],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        if rng.random() < 0.5:
            image = F.horizontal_flip(image)
        image = rand_augment(image, IMAGE_OPS, self.num_ops, self.magnitude, rng)
        return image.unsqueeze(0).expand(self.num_frm, -1, -1, -1).contiguous()


class EvalTransform:
    """Deterministic: resize to image_size (a no-op when decoded at that size)."""

    def __init__(self, image_size):
        self.image_size = image_size

    def __call__(self, clip):
        if tuple(clip.shape[-2:]) != (self.image_size, self.image_size):
            clip = F.resize(clip, [self.image_size, self.image_size], antialias=True)
        return clip
