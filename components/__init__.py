"""One thin Kubeflow component per marble stage.

Each module defines the component function (config dict in, `MarbleConfig.model_validate` first,
artifact paths in and out, one call of the stage function in `marble.stages`, outputs written) and
`build(containerized)`. Heavy imports stay inside the function bodies, so compiling the pipeline needs
only kfp.

Two forms of the same function:
- lightweight (`containerized=False`): kfp embeds the function's source in the task command; used by
  `kfp.local.SubprocessRunner` for `marble pipeline run --local` (the project must be installed in the
  running venv; `install_kfp_package=False` because kfp already is);
- containerized (`containerized=True`): the task runs `python3 -m kfp.dsl.executor_main` inside the
  pinned image of `pipelines/images.py`, which finds the function through `kfp_config.ini`
  (dockerfiles/kfp_config.ini); used for the compiled pipeline that runs on a cluster.
"""
