"""The model: its registry of checkpoints (download, verify, cache), building SAM2 with MedSAM2's
predictor, loading on a device and precision, and optional compilation."""
