"""Training: the engine, its run folder, trackers, on-policy steps and the Hugging Face Trainer."""
