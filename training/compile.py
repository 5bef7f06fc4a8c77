"""--compile: torch.compile of the visual encoder, the measured hot spot of every script.

Only the visual encoder: its input shapes are fixed by the config (frames, image size), so it
compiles into few graphs, while the text side (captions padded to each batch's longest), the
ITC queue and ITM hard-negative sampling (data-dependent) would recompile or break graphs
for little gain.
"""
import os
import shutil

import torch

from runtime.errors import UserError

# A testing aid, not for users: another torch.compile backend than inductor, e.g. aot_eager,
# which traces the same graphs and backward but generates no C++ (inductor spends about
# 95 s compiling a toy run on a 2-vCPU machine: docs/scale_out.md).
BACKEND_VARIABLE = "TESTA_COMPILE_BACKEND"


def compile_visual_encoder(model: torch.nn.Module, device: torch.device) -> None:
    """Compile `model.visual_encoder` in place (nn.Module.compile), before any DDP wrapping, as
    torch recommends: its parameters and state-dict keys stay the eager ones (torch.compile's
    wrapper would add `_orig_mod.` to every key), so checkpoints are unchanged."""
    backend = os.environ.get(BACKEND_VARIABLE, "inductor")
    compiler = os.environ.get("CXX", "g++")  # the compiler inductor looks for on Linux
    if backend == "inductor" and device.type == "cpu" and shutil.which(compiler) is None:
        raise UserError(f"--compile on the CPU needs a C++ compiler, and {compiler} was not found: "
                        "install g++ (or set CXX to one), or run without --compile")
    model.visual_encoder.compile(backend=backend)
    print(f"--compile: the visual encoder is compiled by torch.compile (backend {backend})")
