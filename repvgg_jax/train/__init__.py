"""Training: the trainer (mesh, checkpoints, resume, evaluation), the train and
eval steps, the optimizer and schedule, checkpointing and run logs."""
