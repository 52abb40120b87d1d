"""TEST DOUBLE of ``huggingface_hub.constants``: the cache location, computed as the real client does."""

from __future__ import annotations

import os

HF_HOME = os.path.expanduser(os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"))
HF_HUB_CACHE = os.environ.get("HF_HUB_CACHE") or os.path.join(HF_HOME, "hub")
