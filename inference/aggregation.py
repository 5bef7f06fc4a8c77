"""Pictures of what the video encoder merged, in the style of the TESTA paper's figures.

``TimeSformer.forward_with_trace(video, sources=True)`` says which input patches every output
token holds. Here that becomes a map from every (frame, patch row, patch col) to the token that
holds it, a colour per token, and a PNG of the frames side by side with every token's region
tinted in its colour and the region borders drawn: patches merged within a frame form one
region, frames merged in time show the same regions in the same colours.
"""
import colorsys
import os
import pathlib
import uuid

import numpy as np
import torch
from PIL import Image
from torch import Tensor

GOLDEN_RATIO_CONJUGATE = 0.6180339887498949
TINT = 0.5  # share of the token colour in a tinted pixel
BORDER_COLOUR = (255, 255, 255)
BACKGROUND_COLOUR = (255, 255, 255)
GAP = 4  # pixels between frames in the grid
MAX_COLUMNS = 8  # frames per row of the grid
GIF_STEP_MS = 800


def token_regions(source: Tensor, frames: int, grid: tuple[int, int]) -> np.ndarray:
    """(output tokens, 1 + frames*L) membership of one clip -> (frames, rows, cols) int64:
    the output token (row of ``source``) that holds each input patch.

    ``source`` is one clip of ``EncoderTrace.source``: column 0 is [CLS], patch l of frame t
    is column 1 + l*frames + t, and every patch is held by exactly one token.
    """
    rows, cols = grid
    patches = source[:, 1:]
    if patches.shape[1] != frames * rows * cols:
        raise ValueError(f"source holds {patches.shape[1]} patches, expected {frames} frames of {rows}x{cols}")
    if not torch.equal(patches.sum(dim=0), torch.ones_like(patches[0])):
        raise ValueError("source is not a partition: every input patch must be held by exactly one token")
    owner = patches.argmax(dim=0).view(rows * cols, frames)  # patch-major -> (L, T)
    return owner.t().reshape(frames, rows, cols).cpu().numpy()


def token_colors(count: int, seed: int = 0) -> np.ndarray:
    """(count, 3) uint8 palette: consecutive entries are a golden-ratio step apart in hue
    (as far apart as hues stay however many there are); saturation and brightness vary a
    little, seeded, so that the palette, and every picture, is reproducible."""
    rng = np.random.default_rng(seed)
    hues = (rng.random() + GOLDEN_RATIO_CONJUGATE * np.arange(count)) % 1.0
    saturations = rng.uniform(0.55, 0.95, count)
    values = rng.uniform(0.75, 1.0, count)
    rgb = [colorsys.hsv_to_rgb(*hsv) for hsv in zip(hues, saturations, values)]
    return np.round(np.array(rgb, dtype=np.float64).reshape(count, 3) * 255).astype(np.uint8)


def region_colors(regions: np.ndarray, seed: int = 0) -> np.ndarray:
    """(frames, rows, cols) token ids -> (frames, rows, cols, 3) uint8 colours, one per token.

    A token is coloured by its first patch in frame-major raster order, not by its id: ids
    are renumbered after every block, first patches are not, so a token keeps its colour
    from block to block as it grows (per-block pictures and the GIF stay comparable), and
    unmerged side-by-side patches get palette entries a golden-ratio step apart in hue.
    """
    flat = regions.reshape(-1)
    first_patch = np.full(flat.max() + 1, flat.size)
    np.minimum.at(first_patch, flat, np.arange(flat.size))
    palette = token_colors(flat.size, seed)
    return palette[first_patch[regions]]


def _border_mask(ids: np.ndarray, half_width: int) -> np.ndarray:
    """Pixels within ``half_width`` of a change of token id, on both sides of it."""
    mask = np.zeros(ids.shape, dtype=bool)
    across_cols = ids[:, 1:] != ids[:, :-1]  # between pixel c and c+1 of a row
    across_rows = ids[1:, :] != ids[:-1, :]
    for shift in range(half_width):
        mask[:, shift + 1:] |= across_cols[:, :across_cols.shape[1] - shift]
        mask[:, :across_cols.shape[1] - shift] |= across_cols[:, shift:]
        mask[shift + 1:, :] |= across_rows[:across_rows.shape[0] - shift, :]
        mask[:across_rows.shape[0] - shift, :] |= across_rows[shift:, :]
    return mask


def tinted_frame(frame: np.ndarray, regions: np.ndarray, colors: np.ndarray, scale: int = 1) -> np.ndarray:
    """One (H, W, 3) uint8 frame, enlarged ``scale`` times, tinted by its (rows, cols) token
    regions in their (rows, cols, 3) colours, with the region borders drawn."""
    height, width = frame.shape[:2]
    rows, cols = regions.shape
    if height % rows or width % cols:
        raise ValueError(f"frame {height}x{width} does not split into {rows}x{cols} patches")
    patch_h, patch_w = height // rows * scale, width // cols * scale
    pixels = frame.repeat(scale, axis=0).repeat(scale, axis=1).astype(np.float32)
    ids = regions.repeat(patch_h, axis=0).repeat(patch_w, axis=1)
    tint = colors.repeat(patch_h, axis=0).repeat(patch_w, axis=1).astype(np.float32)
    out = (1.0 - TINT) * pixels + TINT * tint
    out[_border_mask(ids, max(1, scale // 4))] = BORDER_COLOUR
    return np.round(out).astype(np.uint8)


def grid_image(tiles: list[np.ndarray], columns: int = MAX_COLUMNS) -> Image.Image:
    """Equal-sized (h, w, 3) tiles side by side, ``columns`` to a row, ``GAP`` pixels apart."""
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    height, width = tiles[0].shape[:2]
    canvas = Image.new("RGB", (columns * width + (columns - 1) * GAP, rows * height + (rows - 1) * GAP),
                       BACKGROUND_COLOUR)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, columns)
        canvas.paste(Image.fromarray(tile), (col * (width + GAP), row * (height + GAP)))
    return canvas


def aggregation_image(frames: np.ndarray, source: Tensor, grid: tuple[int, int], scale: int = 1,
                      seed: int = 0) -> Image.Image:
    """The grid picture of (T, H, W, 3) uint8 ``frames``, cut into ``grid`` (rows, cols) patches,
    under one clip's ``source``."""
    regions = token_regions(source, len(frames), grid)
    colors = region_colors(regions, seed)
    return grid_image([tinted_frame(frame, region, color, scale)
                       for frame, region, color in zip(frames, regions, colors)])


def save_whole(image: Image.Image, path: pathlib.Path, **options) -> None:
    """Save ``image`` under a name of its own next to ``path``, on disk, then rename it over
    ``path``: a crash, a full disk or a second writer never leaves a half-written picture, and
    a failed save keeps the previous one."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(temporary, "xb") as handle:
            image.save(handle, format=Image.registered_extensions()[path.suffix.lower()], **options)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _check_frames(clip: Tensor, frames: np.ndarray) -> None:
    if clip.dim() != 5 or clip.shape[0] != 1:
        raise ValueError(f"clip must be one video (1, C, T, H, W), got {tuple(clip.shape)}")
    expected = (clip.shape[2], clip.shape[3], clip.shape[4], 3)
    if frames.dtype != np.uint8 or frames.shape != expected:
        raise ValueError(f"frames must be uint8 {expected} (the clip's frames), got {frames.dtype} {frames.shape}")


def render_aggregation(encoder, clip: Tensor, frames: np.ndarray, out_path, per_block: bool = False,
                       gif: bool = False, scale: int = 1, seed: int = 0) -> list[pathlib.Path]:
    """Write the picture of the tokens ``encoder`` (a TimeSformer) ends with for ``clip``.

    clip: the (1, C, T, H, W) tensor the encoder gets (uint8 or normalised); frames: the same frames as uint8
    (T, H, W, 3). Writes ``out_path`` (PNG); with ``per_block`` also ``<stem>_block01.png``...
    (after each block); with ``gif`` an animated ``<stem>_blocks.gif`` stepping through the
    blocks. The encoder runs in eval mode (no stochastic depth) and is put back as it was.
    Returns the written paths, the final picture first.
    """
    _check_frames(clip, frames)
    patch = encoder.patch_embed.proj.kernel_size[0]
    grid = (clip.shape[3] // patch, clip.shape[4] // patch)
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    was_training = encoder.training
    try:
        with torch.no_grad():
            _, trace = encoder.eval().forward_with_trace(clip, sources=True, block_sources=per_block or gif)
    finally:
        encoder.train(was_training)
    save_whole(aggregation_image(frames, trace.source[0], grid, scale, seed), out_path)
    written = [out_path]
    block_images = [aggregation_image(frames, source[0], grid, scale, seed)
                    for source in trace.block_sources]
    if per_block:
        for index, image in enumerate(block_images, start=1):
            written.append(out_path.with_name(f"{out_path.stem}_block{index:02d}.png"))
            save_whole(image, written[-1])
    if gif:
        written.append(out_path.with_name(f"{out_path.stem}_blocks.gif"))
        save_whole(block_images[0], written[-1], save_all=True, append_images=block_images[1:],
                   duration=GIF_STEP_MS, loop=0)
    return written
