"""Training: the trainer (mesh, checkpoints, resume, evaluation), the train and
eval steps, the optimizer and schedule, and run logs. The checkpoints and the
run's files, which conversion and export read too, are `repvgg_jax.checkpointing`
and `repvgg_jax.run_files`."""
