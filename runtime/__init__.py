"""What every part of a run stands on, written once: process groups and rank queries
(distributed), autocast and gradient scaling (precision), progress lines with rates and ETAs
(progress), the user-error type and its one-line boundary (errors), NaN/inf checks (numerics),
an output folder's lock (run_lock), splitting items over processes (sharding), what a run's
record says of its software, device and code (provenance), Ctrl-C with decoding workers
(interrupts), the failures tests inject at a known step (fault_injection), and the machine's
name and peak memory, for benchmarks and the frontier sweep (machine).

It imports nothing of this project but utils.py, so configs, data, models, evaluation,
inference and training can all build on it."""
