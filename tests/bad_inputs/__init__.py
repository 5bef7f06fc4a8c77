"""The table of bad inputs that tests/test_bad_inputs.py runs: one module of cases per class
(docs/reliability.md lists the classes and what each prints).

A case runs a real entry script or tool in a fresh folder and states what must come out: the
exit code, and the one `error:` line (or, for a run that goes on, the one `warning:` line) as a
regular expression. No case may print a traceback.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Overrides that keep a toy run to seconds.
SMALL = ["depth=2", "testa_r=[1,2,1,2]", "max_epoch=1", "num_workers=0", "batch_size_test=8", "batch_size_train=4"]
SMALL_PRETRAIN = ["depth=2", "testa_r=[1,2,1,2]", "max_epoch=1", "num_workers=0", "batch_size=4"]
CLASS_MODULES = ("nonfinite", "checkpoint_fit", "resume_fit", "values", "tool_files", "meaningless", "paths",
                 "interrupts")


@dataclass
class Workspace:
    """What the cases share (built once per test session) and the case's own folder."""
    corpus: Path  # data.toy.write_corpus: videos/, ann/, images/
    checkpoints: dict  # "retrieval", "qa", "pretrain": toy-sized {'model': state_dict} files (depth 2)
    folder: Path  # empty, the case's own

    def retrieval(self, *extra, out=None) -> list[str]:
        return ["train_video_retrieval.py", "--config", "configs/toy/retrieval.yaml", "--output_dir",
                str(out or self.folder / "out"), f"video_root={self.corpus}/videos", f"ann_root={self.corpus}/ann",
                *SMALL, *extra]

    def qa(self, *extra, out=None) -> list[str]:
        return ["train_video_qa.py", "--config", "configs/toy/qa.yaml", "--output_dir",
                str(out or self.folder / "out"), f"video_root={self.corpus}/videos", f"ann_root={self.corpus}/ann",
                *SMALL, *extra]

    def pretrain(self, *extra, out=None) -> list[str]:
        return ["video_pretrain.py", "--config", "configs/toy/pretrain.yaml", "--output_dir",
                str(out or self.folder / "out"), f"video_root={self.corpus}",
                f"train_file=[{self.corpus}/ann/pretrain.json]", *SMALL_PRETRAIN, *extra]


@dataclass(frozen=True)
class Case:
    name: str
    command: Callable[[Workspace], list[str]]  # a script or tool and its arguments, run from the repository
    expect: str  # regular expression the one line must match (searched, not anchored)
    exit_code: int = 1
    stream: str = "error"  # "error": one `error:` line on stderr; "warning": a `warning:` line
    setup: Callable[[Workspace], None] | None = None  # prepares the case's folder first
    timeout: int = 300
    env: dict = field(default_factory=dict)  # set for the command beside the test's own environment


def all_cases() -> list[tuple[str, Case]]:
    """(class module, case) for every case of every class module."""
    cases = []
    for module in CLASS_MODULES:
        for case in importlib.import_module(f"{__name__}.{module}").CASES:
            cases.append((module, case))
    return cases
