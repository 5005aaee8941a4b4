"""The training system: one loop for every method (`loop.train_and_evaluate`), configs, optimizers."""
