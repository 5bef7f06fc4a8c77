"""Bad inputs: interrupts (docs/reliability.md). Ctrl-C ends a run with one line that says where
it stopped and what checkpoint_last.pth (or the index) holds, and exit status 130 (128 + SIGINT),
no traceback."""
from tests.bad_inputs import Case
from tests.bad_inputs.tool_files import index_into

# Ctrl-C after the first optimiser step: the run sends itself SIGINT there (runtime/fault_injection.py),
# so the signal lands mid-run however busy the machine is (a signal sent from outside after the first
# progress line can arrive after a short run has ended).
CTRL_C_AFTER_FIRST_STEP = {"TESTA_INTERRUPT_AFTER_STEP": "1"}
# The same for `video_tool.py index`, after its first batch of videos, sent to its decoding workers too.
CTRL_C_AFTER_FIRST_BATCH = {"TESTA_INTERRUPT_AFTER_BATCH": "1"}


CASES: list[Case] = [
    # A checkpoint after every step: the one of the step before is on disk.
    Case("ctrl_c_in_retrieval_training", lambda ws: ws.retrieval("batch_size_train=2", "--save_every_steps", "1"),
         r"^error: interrupted at epoch 0 step \d+ \(batch \d+/5\); checkpoint_last\.pth from step \d+ kept$",
         exit_code=130, env=CTRL_C_AFTER_FIRST_STEP),
    # Checkpoints only at the epoch's end (11 steps away).
    Case("ctrl_c_in_qa_training_before_any_checkpoint", lambda ws: ws.qa(),
         r"^error: interrupted at epoch 0 step \d+ \(batch \d+/11\); no checkpoint written yet$", exit_code=130,
         env=CTRL_C_AFTER_FIRST_STEP),
    Case("ctrl_c_in_pretraining", lambda ws: ws.pretrain("batch_size=2"),
         r"^error: interrupted at epoch 0 step \d+ \(batch \d+/\d+\); no checkpoint written yet$", exit_code=130,
         env=CTRL_C_AFTER_FIRST_STEP),
    # 16 videos in batches of 2, decoded by a worker process: nothing of the run is committed, the
    # first batch's part is kept for the same command.
    Case("ctrl_c_while_indexing", lambda ws: index_into(ws, "--num_workers", "1", "--batch_size", "2"),
         r"^error: interrupted: index .*/index not updated \(no index was written\); nothing of this run was "
         r"committed; the videos encoded so far are kept in .*/index/\.index-parts: the same command resumes$",
         exit_code=130, env=CTRL_C_AFTER_FIRST_BATCH),
]
