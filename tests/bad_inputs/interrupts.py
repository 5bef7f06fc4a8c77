"""Bad inputs: interrupts (docs/reliability.md). Ctrl-C ends a run with one line that says where
it stopped and what checkpoint_last.pth holds, and exit status 130 (128 + SIGINT), no traceback."""
from tests.bad_inputs import Case

# tests/bad_inputs/send_sigint.py sends SIGINT when this, the first progress line of training
# (--log_every 1: after the first step), appears. The signal lands in the second step, unless a
# busy machine delays it: the lines leave the step open.
FIRST_STEP_DONE = "Train epoch: [0] ["


def ctrl_c_after_first_step(argv: list[str]) -> list[str]:
    return ["tests/bad_inputs/send_sigint.py", FIRST_STEP_DONE, *argv, "--log_every", "1"]


CASES: list[Case] = [
    # A checkpoint after every step: the one of the step before is on disk.
    Case("ctrl_c_in_retrieval_training",
         lambda ws: ctrl_c_after_first_step(ws.retrieval("batch_size_train=2", "--save_every_steps", "1")),
         r"^error: interrupted at epoch 0 step \d+ \(batch \d+/5\); checkpoint_last\.pth from step \d+ kept$",
         exit_code=130),
    # Checkpoints only at the epoch's end (11 steps away).
    Case("ctrl_c_in_qa_training_before_any_checkpoint", lambda ws: ctrl_c_after_first_step(ws.qa()),
         r"^error: interrupted at epoch 0 step \d+ \(batch \d+/11\); no checkpoint written yet$", exit_code=130),
    Case("ctrl_c_in_pretraining", lambda ws: ctrl_c_after_first_step(ws.pretrain("batch_size=2")),
         r"^error: interrupted at epoch 0 step \d+ \(batch \d+/\d+\); no checkpoint written yet$", exit_code=130),
]
