"""A video file as the evaluation reads it, for a model's users (models.create_model_and_transforms)."""
import torch

from .datasets import ClipDataset, encoder_layout
from .video import read_video


class ClipPreprocess:
    """`num_frm_test` frames sampled by `frm_sampling_strategy_test`, decoded at `image_size` and
    normalised as evaluation does, in the encoder's layout: ``preprocess(path)`` is (C, T, H, W),
    so ``torch.stack`` of several is a batch. Reading goes through the evaluation dataset's own
    code, so a clip equals the one evaluation computes for the same file; an unreadable file
    raises data.video.VideoReadError."""

    def __init__(self, config: dict):
        self.clips = ClipDataset(config, "video files", train=False, substitute_black_on_error=False)

    def __call__(self, path) -> torch.Tensor:
        return self.clips.load_video(str(path))

    def with_frames(self, path) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampled frames as uint8 (T, C, H, W), to show what the model sees, and the clip
        made of them, from one decode."""
        clips = self.clips
        frames = read_video(str(path), clips.num_frm, clips.strategy, clips.decode_size)
        return frames, encoder_layout(clips.transform(frames))
