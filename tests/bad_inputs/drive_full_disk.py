"""`drive_full_disk.py ARGS...` runs `video_tool.py ARGS...` on a disk with no room left: the
allocation of every file the tool reserves space for fails as the kernel fails it on a full
disk (ENOSPC). Everything else is the real tool; a tmpfs of a chosen size would need root."""
import errno
import os
import sys


def no_space_left(descriptor: int, offset: int, length: int) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


if __name__ == "__main__":
    os.posix_fallocate = no_space_left
    import video_tool
    video_tool.main(sys.argv[1:])
