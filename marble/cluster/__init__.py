"""Running marble on a Kubernetes cluster: process layout, launch commands, the PyTorchJob launcher.

Pure modules (`quantity`, `layout`) are imported by the config; `launch` builds the distributed launch
of `marble train`; `pytorchjob` builds, submits, watches and cleans up the multi-node job through the
Kubernetes API. Components in `components/` call these; they hold no logic of their own.
"""
