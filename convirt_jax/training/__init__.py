"""The training library the jobs import: state, optimizer and schedules, train/eval steps, checkpoints,
metric logging, preemption and the workdir lock. No job logic and no command line here."""
