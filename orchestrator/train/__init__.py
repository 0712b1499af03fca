"""Training: the config, the driver (driver.py), the per-worker loop (worker.py), MLflow tracking."""
