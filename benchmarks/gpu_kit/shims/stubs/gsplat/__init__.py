"""Stub of ``gsplat`` for random-weight GPU runs only (see ../../README.md): importable, raises when used."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _unavailable(*args, **kwargs):
        raise NotImplementedError("gsplat." + name + " is a stub here (random-weight GPU run); install the real gsplat")

    return _unavailable
