"""omni.train: the one trainer every stage and align run uses (trainer.py), its config (config.py),
engines (engines.py: the engine registry), optimiser, checkpoints, FLOP counting and schedules."""
