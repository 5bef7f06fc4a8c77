"""Start the entry scripts as groups of processes (torchrun launchers, srun-like tasks) for the
multi-process tests, and make sure none outlives its test."""
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from tests.helpers import REPO_ROOT

# Variables of an enclosing torchrun or SLURM job would change what the launched scripts join.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**extra: str) -> dict:
    """This environment without launcher variables, one thread per process. The launched scripts
    lie at the repository root, which Python puts first on their sys.path (under torchrun too)."""
    env = {name: text for name, text in os.environ.items()
           if name not in _LAUNCHER_VARIABLES and not name.startswith(("SLURM_", "TESTA_"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun(script_args: list, nnodes: int, nproc_per_node: int, port: int, rdzv_id: str,
             max_restarts: int = 0) -> list[str]:
    """One torchrun launcher (one "node") of a c10d rendezvous at 127.0.0.1:port."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            f"--nproc_per_node={nproc_per_node}", f"--max-restarts={max_restarts}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={rdzv_id}", *script_args]


def torchrun_nodes(script_args: list, nnodes: int, nproc_per_node: int, max_restarts: int = 0) -> list[list[str]]:
    """The launcher commands of every node of one run (a fresh port and run id)."""
    port, rdzv_id = free_port(), uuid.uuid4().hex
    return [torchrun(script_args, nnodes, nproc_per_node, port, rdzv_id, max_restarts)] * nnodes


def run_together(commands: list[list[str]], envs: list[dict] | None = None, timeout: float = 240) -> list[str]:
    """Start every command at once (each in its own session), wait for all, and return their
    outputs; any failure or timeout kills every process group and fails with the outputs."""
    envs = envs or [environment()] * len(commands)
    logs = [tempfile.TemporaryFile("w+") for _ in commands]
    processes = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
                 for command, env, log in zip(commands, envs, logs)]
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _stop(processes)
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    codes = [process.returncode for process in processes]
    report = "\n".join(f"--- {' '.join(map(str, command[1:4]))}... exit {code}\n{output[-4000:]}"
                       for command, code, output in zip(commands, codes, outputs))
    assert codes == [0] * len(commands), (f"timed out after {timeout} s\n" if timed_out else "") + report
    return outputs


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM first: torchrun then stops its workers, which run in sessions of their own;
    SIGKILL what is left after a grace period."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        os.killpg(process.pid, signal.SIGTERM)
    for process in running:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
