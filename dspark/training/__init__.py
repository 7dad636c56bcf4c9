"""Drafter training: data generation through the engine, the training loop, calibration and checkpoints.

It sits above the engine (it builds one to generate the target's responses), so it lives apart from the
drafter's model and proposer in `dspark.drafters`, which the engine's builder imports.
"""
