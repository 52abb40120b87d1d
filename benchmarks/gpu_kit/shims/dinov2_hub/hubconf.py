"""Local torch.hub entry for DINOv2 (random-weight GPU runs only; see ../README.md).

SAM 3D Objects builds its DINOv2 encoders with ``torch.hub.load("facebookresearch/dinov2", ...)``, which needs
the network. The run's configs point ``repo_or_dir`` here with ``source: local`` and ``pretrained: false``;
the architecture comes from MoGe's vendored copy of DINOv2.
"""

dependencies = ["torch"]

from moge.model.dinov2.hub.backbones import dinov2_vitl14_reg  # noqa: E402,F401
