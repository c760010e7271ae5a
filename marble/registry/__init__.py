"""Model registries (MLflow, Kubeflow Model Registry) and the register stage."""
