"""Shim of ``pytorch3d.structures`` for random-weight GPU runs only (see ../README.md).

``Meshes`` and ``Pointclouds`` are placeholders that raise when instantiated: the default inference path
(no layout post-optimisation, no notebook ``make_scene``) never builds them.
"""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} is not available in the pytorch3d shim; install the real pytorch3d"
        )


class Meshes(_Unavailable):
    pass


class Pointclouds(_Unavailable):
    pass
