"""The Kubeflow pipeline of marble: the DAG, images, local run, compile and schedule.

Nothing here holds logic the `marble` library lacks: the pipeline wires the five stage components
(`components/`) and sets Kubernetes options; `local.py` runs it with Kubeflow's SubprocessRunner.
Compiling needs only kfp and kfp-kubernetes.
"""
