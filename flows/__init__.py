"""Prefect flows that drive the DVC pipeline defined in ``dvc.yaml``."""
