"""The faster augmentation and the uint8 hand-off give the same numbers as the plain definitions."""
import random

import pytest
import torch
import torchvision.transforms.v2.functional as F

from data.transforms import AUGMENT_OPS, FILL, FRAMES_PER_CHUNK, _affine
from models.pixels import MEAN, STD, normalize
from models.timesformer import TimeSformer


@pytest.mark.parametrize("angle, shear", [(0.0, (0.0, 0.0)), (17.3, (0.0, 0.0)), (-30.0, (0.0, 0.0)),
                                          (0.0, (8.5, 0.0)), (0.0, (0.0, -17.0)), (12.0, (-5.0, 9.0))])
@pytest.mark.parametrize("height, width", [(24, 24), (37, 53)])
def test_affine_gather_equals_torchvision_affine(angle, shear, height, width):
    clip = torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    expected = F.affine(clip, angle=angle, translate=[0, 0], scale=1.0, shear=list(shear), fill=FILL)
    assert torch.equal(_affine(clip, angle, shear), expected)


@pytest.mark.parametrize("name, reference", [("brightness", F.adjust_brightness), ("contrast", F.adjust_contrast)])
def test_chunked_colour_ops_equal_torchvision_on_the_whole_clip(name, reference):
    clip = torch.randint(0, 256, (2 * FRAMES_PER_CHUNK + 1, 3, 20, 20), dtype=torch.uint8)
    rng = random.Random(4)
    factor = 1 + rng.choice((-1, 1)) * 0.9 * 5 / 10  # what the op draws from the same generator
    assert torch.equal(AUGMENT_OPS[name](clip, 5, random.Random(4)), reference(clip, factor))


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
