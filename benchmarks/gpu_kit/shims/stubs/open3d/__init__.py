"""Stub of ``open3d`` for random-weight GPU runs only (see ../../README.md): importable, raises when used."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _unavailable(*args, **kwargs):
        raise NotImplementedError("open3d." + name + " is a stub here (random-weight GPU run); install the real open3d")

    return _unavailable
