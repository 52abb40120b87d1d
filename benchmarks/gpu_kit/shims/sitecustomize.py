"""GPU kit only (benchmarks/gpu_kit/README.md): record each Python process's CUDA peak memory in a file.

Python imports ``sitecustomize`` at start from the first folder of ``sys.path`` that has one; the kit's
``site/`` is on ``PYTHONPATH``, so every process of a kit run (the driver, both stage workers) passes here.
Nothing happens unless ``GPU_KIT_PEAKS_DIR`` is set. Then a daemon thread writes, once a second,
``<dir>/<role>-<pid>.json`` with ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of every device
the process has initialised; ``role`` is the stage worker's module (``segment``, ``reconstruct``) or ``main``.
It never imports torch nor initialises CUDA itself: a process that never uses the GPU writes nothing. The file
is also written at exit, and every second, so a worker that is killed keeps its last reading.

Afterwards any other ``sitecustomize`` further down ``sys.path`` (the image's own, if it has one) is run too.
"""

from __future__ import annotations

import os
import sys


def _role() -> str:
    argv = list(getattr(sys, "orig_argv", sys.argv))
    for i, arg in enumerate(argv):
        if arg == "-m" and i + 1 < len(argv) and argv[i + 1].startswith("pipeline.stages."):
            return argv[i + 1].rsplit(".", 1)[1]
    return "main"


def _start(folder: str) -> None:
    import atexit
    import json
    import threading
    import time

    role = _role()
    path = os.path.join(folder, f"{role}-{os.getpid()}.json")
    last: dict = {}

    def read() -> dict | None:
        torch = sys.modules.get("torch")
        if torch is None or not hasattr(torch, "cuda"):
            return None
        try:
            if not torch.cuda.is_initialized():
                return None
            devices = {}
            for d in range(torch.cuda.device_count()):
                allocated = torch.cuda.max_memory_allocated(d)
                if allocated:
                    devices[str(d)] = {"max_allocated_gib": round(allocated / 2**30, 3),
                                       "max_reserved_gib": round(torch.cuda.max_memory_reserved(d) / 2**30, 3),
                                       "reserved_now_gib": round(torch.cuda.memory_reserved(d) / 2**30, 3)}
            return devices or None
        except Exception:  # noqa: BLE001 - never disturb the process being measured
            return None

    def write() -> None:
        devices = read()
        if devices is None or devices == last.get("devices"):
            return
        last["devices"] = devices
        record = {"role": role, "pid": os.getpid(), "time": time.time(), "argv": sys.argv[:3], "devices": devices}
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f)
            os.replace(tmp, path)
        except OSError:
            pass

    def loop() -> None:
        while True:
            time.sleep(1.0)
            write()

    threading.Thread(target=loop, name="gpu-kit-peaks", daemon=True).start()
    atexit.register(write)


def _chain() -> None:
    """Run the next ``sitecustomize`` on ``sys.path`` after this one (if any)."""
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        folder = os.path.abspath(entry or os.getcwd())
        if folder == here:
            continue
        candidate = os.path.join(folder, "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_image_sitecustomize", candidate)
            if spec and spec.loader:
                try:
                    spec.loader.exec_module(importlib.util.module_from_spec(spec))
                except Exception as exc:  # noqa: BLE001
                    print(f"gpu-kit sitecustomize: {candidate} failed: {exc}", file=sys.stderr)
            return


if os.environ.get("GPU_KIT_PEAKS_DIR"):
    try:
        os.makedirs(os.environ["GPU_KIT_PEAKS_DIR"], exist_ok=True)
        _start(os.environ["GPU_KIT_PEAKS_DIR"])
    except Exception as _exc:  # noqa: BLE001
        print(f"gpu-kit sitecustomize: peak recorder not started: {_exc}", file=sys.stderr)
_chain()
