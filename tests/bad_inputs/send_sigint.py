"""Ctrl-C for a bad-input case: `send_sigint.py TEXT SCRIPT ARGS...` runs `python SCRIPT ARGS...`,
sends it SIGINT as soon as a line of its output contains TEXT, and ends with its exit status
(130 for 128 + SIGINT when the signal itself ended it). Its stdout is echoed here, its stderr
passes through."""
import signal
import subprocess
import sys


def main(trigger: str, argv: list[str]) -> int:
    child = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True, bufsize=1)
    sent = False
    for line in child.stdout:
        sys.stdout.write(line)
        if not sent and trigger in line:
            child.send_signal(signal.SIGINT)
            sent = True
    status = child.wait()
    if not sent:
        print(f"send_sigint: no output line contained {trigger!r}; no signal was sent")
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
