"""Image + text → SAM3 masks → SAM 3D Objects Gaussians, meshes and a composed scene.

Where code runs, by folder:

- ``pipeline/driver/``: the driver (CLI, engine, batch, web server, worker and vLLM lifecycle). Light
  dependencies only; never imports torch.
- ``pipeline/stages/``: the stage workers and the code they run (post-processing, scene composition, the VLM
  agent), imported inside a stage env by ``python -m pipeline.stages.<stage>``.
- ``pipeline/backends/``: model code (SAM3, SAM 3D Objects), imported only inside its stage env.
- top level: the one contract both sides share: :mod:`~pipeline.config`, :mod:`~pipeline.handoff`
  (manifests, file names), :mod:`~pipeline.errors`, :mod:`~pipeline.atomic`, :mod:`~pipeline.images`;
  plus the public entry points :mod:`~pipeline.api` (Python) and ``python -m pipeline`` (CLI).
"""

__version__ = "0.1.0"
