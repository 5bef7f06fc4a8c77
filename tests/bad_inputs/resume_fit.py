"""Bad inputs: a resume must fit its run (docs/reliability.md). Each case resumes a copy of a
finished 1-epoch toy run (max_epoch=1) with max_epoch=2, which may change, and one change
that changes training."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.bad_inputs import Case, Workspace
from tests.helpers import REPO_ROOT

DIFFERENT = r"checkpoint_last\.pth was written under other settings that change training \(checkpoint -> this run\): "
HINT = r"; resume with the checkpoint's settings, use another --output_dir, or pass --resume_with_changes"


def first_run(ws: Workspace, processes: int = 1) -> Path:
    """A finished 1-epoch toy retrieval run of `processes` processes, made once per test session
    beside the shared corpus (cases copy it or load its checkpoints, never write into it)."""
    done = ws.corpus.parent / f"first_run_{processes}"
    if not done.is_dir():
        making = done.with_name(f"{done.name}.{os.getpid()}")
        shutil.rmtree(making, ignore_errors=True)
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}"] if processes > 1 else []
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
        result = subprocess.run([sys.executable, *launcher, *ws.retrieval(out=making)], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        making.rename(done)
    return done


def resumable(processes: int = 1):
    """A setup: the case's output folder is a copy of the finished first run."""
    return lambda ws: shutil.copytree(first_run(ws, processes), ws.folder / "out")


CASES: list[Case] = [
    Case("another_batch_size", lambda ws: ws.retrieval("max_epoch=2", "batch_size_train=8"),
         DIFFERENT + r"batch_size_train 4 -> 8" + HINT, setup=resumable()),
    Case("another_batch_size_and_learning_rate",
         lambda ws: ws.retrieval("max_epoch=2", "batch_size_train=8", "init_lr=2e-3"),
         DIFFERENT + r"batch_size_train 4 -> 8, init_lr 0\.001 -> 0\.002" + HINT, setup=resumable()),
    Case("another_world_size", lambda ws: ws.retrieval("max_epoch=2"),
         DIFFERENT + r"world_size 2 -> 1" + HINT, setup=resumable(processes=2)),
    Case("another_accumulation", lambda ws: ws.retrieval("max_epoch=2", "--accumulation_steps", "2"),
         DIFFERENT + r"accumulation_steps 1 -> 2" + HINT, setup=resumable()),
    Case("another_precision", lambda ws: ws.retrieval("max_epoch=2", "--mixed_precision_method", "bf16"),
         DIFFERENT + r"precision fp32 -> bfloat16" + HINT, setup=resumable()),
    Case("another_seed_and_heads", lambda ws: ws.retrieval("max_epoch=2", "num_heads=4", "--seed", "7"),
         DIFFERENT + r"num_heads 2 -> 4, seed 42 -> 7" + HINT, setup=resumable()),
    Case("changes_allowed_by_the_flag",
         lambda ws: ws.retrieval("max_epoch=2", "batch_size_train=8", "--resume_with_changes"),
         r"^warning: resuming .*checkpoint_last\.pth with changed settings \(checkpoint -> this run\): "
         r"batch_size_train 4 -> 8; recorded in log\.txt$", exit_code=0, stream="warning", setup=resumable()),
    Case("longer_run_keeps_the_earlier_config", lambda ws: ws.retrieval("max_epoch=2"),
         r"config\.yaml differs from this run's config \(max_epoch 1 -> 2\): the earlier one is kept as "
         r"config\.1\.yaml$", exit_code=0, stream="warning", setup=resumable()),
]
