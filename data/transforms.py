"""Clip transforms on uint8 tensors (T, C, H, W): the whole clip is processed at once, and
every random choice is drawn once per clip so all frames get the same augmentation."""
import random

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms import InterpolationMode

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_MAGNITUDE = 10
FILL = [128, 128, 128]  # grey fill for pixels that geometric ops move in


def normalize(clip):
    """uint8 (..., C, H, W) -> float in the spec's normalisation."""
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return clip.float().div_(255).sub_(mean).div_(std)


def _signed(scale, magnitude, rng):
    return rng.choice((-1, 1)) * scale * magnitude / MAX_MAGNITUDE


def _enhance(adjust):
    return lambda x, m, rng: adjust(x, 1 + _signed(0.9, m, rng))


def _affine(x, angle=0.0, shear=(0.0, 0.0)):
    return F.affine(x, angle=angle, translate=[0, 0], scale=1.0, shear=list(shear), fill=FILL)


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


def adjust_sharpness(x, factor):
    """PIL-style sharpness: blend with a copy smoothed by [[1,1,1],[1,5,1],[1,1,1]]/13 (borders
    untouched). The 3x3 sum is built from shifted slices, much faster on CPU than
    torchvision's convolution."""
    image = x.float()
    rows = image[..., :-2, :] + image[..., 1:-1, :] + image[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = image.clone()
    smooth[..., 1:-1, 1:-1] = box.add_(image[..., 1:-1, 1:-1], alpha=4).div_(13)
    return smooth.add_(image.sub_(smooth).mul_(factor)).clamp_(0, 255).round_().to(torch.uint8)


def _shear(axis):
    def op(x, m, rng):
        degrees = _signed(17.0, m, rng)  # about atan(0.3) at full magnitude
        return _affine(x, shear=(degrees, 0.0) if axis == 0 else (0.0, degrees))
    return op


AUGMENT_OPS = {
    "identity": lambda x, m, rng: x,
    "contrast": _enhance(F.adjust_contrast),
    "brightness": _enhance(F.adjust_brightness),
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
        return normalize(rand_augment(clip, VIDEO_OPS, self.num_ops, self.magnitude, rng))


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
        return normalize(image).unsqueeze(0).expand(self.num_frm, -1, -1, -1).contiguous()


class EvalTransform:
    """Deterministic: resize to image_size (a no-op when decoded at that size), normalise."""

    def __init__(self, image_size):
        self.image_size = image_size

    def __call__(self, clip):
        if tuple(clip.shape[-2:]) != (self.image_size, self.image_size):
            clip = F.resize(clip, [self.image_size, self.image_size], antialias=True)
        return normalize(clip)
