"""Image + text → SAM3 masks → SAM 3D Objects Gaussians, meshes and a composed scene.

The package stays light (pydantic, pyyaml, numpy, pillow): heavy libraries are imported only inside the
stage backends, in their own envs. Python API: :class:`pipeline.api.Pipeline`.
"""

__version__ = "0.1.0"
