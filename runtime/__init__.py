"""What every part of a run stands on, written once: process groups and rank queries
(distributed), autocast and gradient scaling (precision), progress lines with rates and ETAs
(progress), the user-error type and its one-line boundary (errors), NaN/inf checks (numerics),
an output folder's lock (run_lock), splitting items over processes (sharding) and what a
run's record says of its software, device and code (provenance).

It imports nothing of this project but utils.py, so configs, data, models, evaluation,
inference and training can all build on it."""
