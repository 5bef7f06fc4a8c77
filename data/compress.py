"""Re-encode videos to a given fps and size with ffmpeg, in parallel (docs/data.md, "Re-encoding videos").

    ls -U VIDEO_DIR > video_names.txt
    python -m data.compress --input_root VIDEO_DIR --output_root OUT --names_file video_names.txt \
        --fps 3 --size 224 [--square] [--duration 60] --num_workers 8

Audio is removed. Files already in OUT are skipped, so a re-run resumes; each output is
written to a temporary name first so an interrupted encode is never taken as done.
Failures are listed at the end (and the exit status is 1).
"""
import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def find_ffmpeg():
    system = shutil.which("ffmpeg")
    if system:
        return system
    try:
        import imageio_ffmpeg
    except ImportError:
        sys.exit("no ffmpeg found: install ffmpeg or the imageio-ffmpeg package")
    return imageio_ffmpeg.get_ffmpeg_exe()


def scale_filter(size, square):
    if square:
        return f"scale={size}:{size}"
    # shorter side to `size`, the other side keeps the aspect ratio (rounded to even for x264)
    return f"scale='if(gt(iw,ih),-2,{size})':'if(gt(iw,ih),{size},-2)'"


def ffmpeg_command(ffmpeg, source, target, fps, size, square, duration):
    command = [ffmpeg, "-y", "-loglevel", "error", "-i", str(source)]
    if duration:
        command += ["-t", str(duration)]
    return command + ["-vf", f"fps={fps},{scale_filter(size, square)}", "-an", "-c:v", "libx264",
                      "-preset", "veryfast", "-pix_fmt", "yuv420p", "-threads", "1", "-f", "mp4", str(target)]


def compress_one(ffmpeg, source, target, fps, size, square, duration):
    """Returns None on success or when already done, else an error message."""
    if target.exists():
        return None
    partial = target.with_name(target.name + ".part")
    result = subprocess.run(ffmpeg_command(ffmpeg, source, partial, fps, size, square, duration),
                            capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
    os.replace(partial, target)
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Re-encode videos with ffmpeg (fps, size, no audio).")
    parser.add_argument("--input_root", required=True)
    parser.add_argument("--output_root", required=True)
    parser.add_argument("--names_file", help="one video file name per line; default: every file in input_root")
    parser.add_argument("--fps", type=float, default=3)
    parser.add_argument("--size", type=int, default=224, help="shorter side, or both sides with --square")
    parser.add_argument("--square", action="store_true")
    parser.add_argument("--duration", type=float, help="keep only the first DURATION seconds")
    parser.add_argument("--num_workers", type=int, default=8)
    args = parser.parse_args(argv)

    input_root, output_root = Path(args.input_root), Path(args.output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    if args.names_file:
        names = [line.strip() for line in Path(args.names_file).read_text().splitlines() if line.strip()]
    else:
        names = sorted(p.name for p in input_root.iterdir() if p.is_file())
    ffmpeg = find_ffmpeg()
    with ThreadPoolExecutor(args.num_workers) as pool:
        errors = list(pool.map(lambda name: compress_one(ffmpeg, input_root / name, output_root / name, args.fps,
                                                         args.size, args.square, args.duration), names))
    failures = [(name, error) for name, error in zip(names, errors) if error]
    print(f"compressed {len(names) - len(failures)} of {len(names)} videos into {output_root}")
    for name, error in failures:
        print(f"FAILED {name}: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
