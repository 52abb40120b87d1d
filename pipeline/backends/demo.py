"""Demo backends: **not models**. They let the whole tool (stage workers, engine, web app, ``python -m pipeline
demo``) run on a laptop CPU with no GPU, envs or weights, and give a result shaped like a real one.

- :class:`DemoSalientSegmenter` (built-in segment backend ``demo``): classical salient-object segmentation
  (scikit-image SLIC superpixels, boundary connectivity and a smoothed contrast map after Zhu et al., CVPR 2014,
  then Otsu's threshold): each connected salient region is one object. It understands **no words** except
  colour names: a phrase with a colour word ("red", "white cup") keeps the objects whose median colour is
  nearest that colour; any other phrase ("cat", "the mug") gets every salient object. Scores are
  ``0.5 + mean saliency / 2`` so the default threshold keeps what was found.
- :class:`DemoReliefReconstructor` (built-in reconstruct backend ``demo``): each mask becomes a coloured
  **relief** — the mask's pixels pushed towards the camera by a dome profile (the square root of the distance to
  the mask's edge) — as Gaussians (one per sampled pixel, in the photo's colours) and a height-field mesh, placed
  where the object is in the photo: a pinhole camera whose longer side spans :data:`FOV_DEG`, the object's
  depth from how low its bottom edge is (lower = nearer, :data:`DEPTH_RANGE_M`).

Both run in the driver's own interpreter (env kind ``current``); they need numpy, PIL, scipy, scikit-image and
trimesh, all in ``requirements.txt``. Work per image is bounded: the segmenter works at
:data:`WORK_SIDE` pixels, the lifter samples at most :data:`MAX_SAMPLES` pixels per object.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image

from pipeline.backends.base import Detections, GaussianSet, ObjectReconstruction, Reconstructor, Segmenter
from pipeline.handoff import Pose

__all__ = ["COLOR_NAMES", "DemoSalientSegmenter", "DemoReliefReconstructor", "FOV_DEG", "focal_px"]

#: The segmenter's working size: the longer side of the image it analyses, in pixels (never upscaled).
WORK_SIDE = 320
#: Superpixels per image, and the colour scale (CIELAB ΔE) of the similarity between neighbours.
_SUPERPIXELS = 400
_SIGMA_LAB = 10.0
#: A salient region smaller than this fraction of the image is dropped.
MIN_AREA_FRACTION = 0.01
#: Colour names a phrase may use, with a representative sRGB value each (nearest in CIELAB wins).
COLOR_NAMES: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30),
    "orange": (235, 125, 30),
    "yellow": (235, 215, 45),
    "green": (45, 160, 60),
    "blue": (35, 75, 200),
    "purple": (120, 50, 160),
    "pink": (240, 150, 185),
    "brown": (115, 70, 35),
    "white": (245, 245, 245),
    "grey": (128, 128, 128),
    "black": (20, 20, 20),
}

#: Other spellings of colour names.
_SPELLINGS = {"gray": "grey"}

#: The lifter's camera: the photo's longer side spans this many degrees (the web viewer's vertical field of view).
FOV_DEG = 50.0
#: Depth in metres of an object whose bottom edge is at the photo's bottom, and of one whose bottom is at its top.
DEPTH_RANGE_M = (2.0, 3.5)
#: How far the relief's centre comes towards the camera, as a fraction of the object's smaller side.
RELIEF = 0.35
#: Pixels sampled per object (Gaussians, and the mesh's vertices).
MAX_SAMPLES = 6000
_SH_C0 = 0.2820948
#: Local z-up object axes in the PyTorch3D camera frame (x left, y up, z forward): x → x, y → -z, z → y.
_CAMERA_FROM_LOCAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(np.asarray(rgb, np.uint8))


@dataclass(frozen=True)
class _Region:
    """One salient object at working resolution: its (h, w) bool mask, mean saliency and colour name."""

    mask: np.ndarray
    saliency: float
    colour: str


def _superpixel_graph(labels: np.ndarray) -> np.ndarray:
    """(E, 2) int pairs ``i < j`` of 4-adjacent superpixels of an (h, w) label map."""
    pairs = np.concatenate([
        np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
        np.stack([labels[:-1].ravel(), labels[1:].ravel()], 1),
    ])
    pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1)
    return np.unique(pairs, axis=0)


def saliency_map(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel saliency in [0, 1] of an (h, w, 3) uint8 image (keep it small: cost grows with the pixels).

    Superpixels (SLIC) → each one's *boundary connectivity* (how much of the region it is geodesically similar to
    touches the image border) gives a background weight; its colour contrast to background-like superpixels,
    weighted by distance, a foreground weight; a quadratic smoothing over neighbours (Zhu et al. 2014) combines
    them.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra
    from skimage.segmentation import slic

    lab = _to_lab(rgb)
    labels = slic(rgb, n_segments=_SUPERPIXELS, compactness=10, start_label=0, channel_axis=-1)
    n = int(labels.max()) + 1
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n).astype(float)
    mean = np.stack([np.bincount(flat, lab[..., c].ravel(), n) for c in range(3)], 1) / np.maximum(area, 1)[:, None]
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border_len = np.bincount(border, minlength=n).astype(float)
    pairs = _superpixel_graph(labels)
    step = np.linalg.norm(mean[pairs[:, 0]] - mean[pairs[:, 1]], axis=1)
    rows, cols = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    geodesic = dijkstra(csr_matrix((np.r_[step, step] + 1e-6, (rows, cols)), shape=(n, n)), directed=False)
    similar = np.exp(-(geodesic**2) / (2 * _SIGMA_LAB**2))
    connectivity = (similar @ border_len) / np.sqrt(np.maximum(similar @ area, 1e-9))
    background = 1 - np.exp(-(connectivity**2) / 2)
    ys, xs = np.indices(labels.shape)
    side = max(labels.shape)
    cy = np.bincount(flat, ys.ravel(), n) / np.maximum(area, 1) / side
    cx = np.bincount(flat, xs.ravel(), n) / np.maximum(area, 1) / side
    near = np.exp(-((cy[:, None] - cy[None]) ** 2 + (cx[:, None] - cx[None]) ** 2) / (2 * 0.25**2))
    contrast = np.linalg.norm(mean[:, None] - mean[None], axis=2)
    foreground = (contrast * near * background[None]).sum(1)
    foreground /= max(foreground.max(), 1e-9)
    smooth = np.exp(-(step**2) / (2 * _SIGMA_LAB**2)) + 0.1
    laplacian = np.zeros((n, n))
    laplacian[pairs[:, 0], pairs[:, 1]] = laplacian[pairs[:, 1], pairs[:, 0]] = -smooth
    laplacian[np.arange(n), np.arange(n)] = -laplacian.sum(1)
    saliency = np.linalg.solve(np.diag(background + foreground + 1e-6) + 0.2 * laplacian, foreground)
    saliency = (saliency - saliency.min()) / max(float(np.ptp(saliency)), 1e-9)
    return saliency[labels]


def colour_name(rgb_pixels: np.ndarray) -> str:
    """The :data:`COLOR_NAMES` entry nearest (CIELAB) to the median of (N, 3) uint8 RGB pixels."""
    median = np.median(np.asarray(rgb_pixels, np.float64).reshape(-1, 3), axis=0)
    names = list(COLOR_NAMES)
    palette = _to_lab(np.array([[COLOR_NAMES[k] for k in names]], np.uint8))[0]
    here = _to_lab(np.round(median).astype(np.uint8)[None, None])[0, 0]
    return names[int(np.argmin(np.linalg.norm(palette - here, axis=1)))]


def salient_regions(rgb: np.ndarray) -> list[_Region]:
    """The salient objects of an (h, w, 3) uint8 image, largest first: connected regions above Otsu's threshold
    of :func:`saliency_map` (at least 0.3), opened, holes filled, at least :data:`MIN_AREA_FRACTION` of it."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    saliency = saliency_map(rgb)
    cut = max(float(threshold_otsu(saliency)), 0.3) if np.ptp(saliency) > 0 else 1.0
    salient = ndimage.binary_fill_holes(ndimage.binary_opening(saliency > cut, iterations=2))
    labels, count = ndimage.label(salient)
    regions = []
    for i in range(1, count + 1):
        mask = labels == i
        if mask.sum() >= MIN_AREA_FRACTION * mask.size:
            regions.append(_Region(mask, float(saliency[mask].mean()), colour_name(rgb[mask])))
    return sorted(regions, key=lambda r: int(r.mask.sum()), reverse=True)


class DemoSalientSegmenter(Segmenter):
    """Salient objects, filtered by colour words (see the module docstring). Not a model."""

    def __init__(self, config: Any) -> None:  # SegmentConfig
        super().__init__(config)
        self.size: tuple[int, int] | None = None  # (W, H) of the image given to set_image
        self.regions: list[_Region] = []

    def set_image(self, image: Image.Image) -> None:
        """Find the image's salient regions at :data:`WORK_SIDE` (the photo is reduced, never enlarged)."""
        rgb = image.convert("RGB")
        self.size = rgb.size
        scale = min(1.0, WORK_SIDE / max(rgb.size))
        if scale < 1.0:
            work = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
            rgb = rgb.resize(work, Image.Resampling.BILINEAR, reducing_gap=2.0)
        self.regions = salient_regions(np.asarray(rgb))

    def predict(self, phrases: Sequence[str]) -> list[Detections]:
        """One Detections per phrase: the salient objects (of the phrase's colours, if it names any)."""
        if self.size is None:
            raise RuntimeError("call set_image() before predict()")
        return [self._detect(phrase) for phrase in phrases]

    def _detect(self, phrase: str) -> Detections:
        assert self.size is not None
        w, h = self.size
        words = {_SPELLINGS.get(w, w) for w in phrase.lower().replace(",", " ").split()}
        colours = words & set(COLOR_NAMES)
        chosen = [r for r in self.regions if not colours or r.colour in colours]
        masks = np.stack([self._full_size(r.mask) for r in chosen]) if chosen else np.zeros((0, h, w), bool)
        boxes = np.zeros((len(chosen), 4), np.float32)
        for i, mask in enumerate(masks):
            ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
            if len(ys):
                boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
        scores = np.array([0.5 + r.saliency / 2 for r in chosen], np.float32)
        return Detections(phrase, masks, boxes, scores)

    def _full_size(self, mask: np.ndarray) -> np.ndarray:
        """A working-resolution mask at the image's own (H, W), edges interpolated (bilinear, cut at one half)."""
        assert self.size is not None
        if mask.shape[::-1] == self.size:
            return mask
        soft = Image.fromarray(mask.astype(np.uint8) * 255).resize(self.size, Image.Resampling.BILINEAR)
        return np.asarray(soft) > 127


def focal_px(height: int, width: int) -> float:
    """The lifter's focal length in pixels: the longer side spans :data:`FOV_DEG`."""
    return max(height, width) / (2.0 * math.tan(math.radians(FOV_DEG) / 2.0))


class DemoReliefReconstructor(Reconstructor):
    """A coloured relief per mask, where the object is in the photo (see the module docstring). Not a model."""

    def prepare(self, image: np.ndarray) -> dict[str, Any]:
        """Keep the (H, W, 3) uint8 photo (the relief's colours) and the focal length in pixels."""
        return {"image": image, "focal": focal_px(*image.shape[:2])}

    def reconstruct(self, context: dict[str, Any], mask: np.ndarray, seed: int) -> ObjectReconstruction:
        """Gaussians (canonical z-up, inside ±0.5) and a height-field mesh (canonical y-up) of the mask's relief,
        with the pose that puts them where the mask is seen (PyTorch3D camera frame, metres).

        ``seed`` does not change the result: the relief is determined by the mask and the photo.
        """
        import trimesh
        from scipy import ndimage

        time.sleep(float(self.config.options.get("delay_s", 0.0)))
        image, focal = context["image"], float(context["focal"])
        h, w = mask.shape
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if not len(rows):
            raise ValueError("the demo lifter got an empty mask; the segment stage should not hand one over")
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        step = max(1, math.ceil(math.sqrt((y1 - y0) * (x1 - x0) / MAX_SAMPLES)))
        grid = mask[y0:y1:step, x0:x1:step]
        colours = image[y0:y1:step, x0:x1:step].astype(np.float64) / 255.0
        edge = ndimage.distance_transform_edt(np.pad(grid, 1))[1:-1, 1:-1]
        profile = np.sqrt(edge / max(float(edge.max()), 1e-9))
        near, far = DEPTH_RANGE_M
        depth = near + (far - near) * (1.0 - y1 / h)
        amplitude = RELIEF * min(y1 - y0, x1 - x0) / focal * depth
        v, u = np.indices(grid.shape, dtype=np.float64)
        u, v = x0 + (u + 0.5) * step, y0 + (v + 0.5) * step
        z = depth - amplitude * profile
        camera = np.stack([-(u - w / 2) / focal * z, -(v - h / 2) / focal * z, z], -1)  # PyTorch3D: x left, y up
        points = camera[grid]
        centre = (points.min(0) + points.max(0)) / 2
        scale = float(max(np.ptp(points, axis=0).max(), 1e-6)) * 1.02
        local = (points - centre) @ _CAMERA_FROM_LOCAL / scale  # p_local = M^T (p_cam - t) / s
        spacing = step / focal * z[grid] / scale
        n = len(local)
        gaussians = GaussianSet(
            xyz=local.astype(np.float32),
            f_dc=((colours[grid] - 0.5) / _SH_C0).astype(np.float32),
            opacity=np.full(n, 4.0, np.float32),
            log_scale=np.repeat(np.log(0.7 * spacing)[:, None], 3, axis=1).astype(np.float32),
            rot_wxyz=np.tile(np.array([1, 0, 0, 0], np.float32), (n, 1)),
        )
        mesh = trimesh.Trimesh(
            vertices=local[:, [0, 2, 1]] * np.array([1.0, 1.0, -1.0]),  # z-up → GLB y-up: (x, z, -y)
            faces=_grid_faces(grid),
            vertex_colors=np.concatenate([np.round(colours[grid] * 255), np.full((n, 1), 255)], 1).astype(np.uint8),
            process=False,
        )
        from pipeline.stages.frames import matrix_to_quat

        pose = Pose(
            quat_wxyz=tuple(float(q) for q in matrix_to_quat(_CAMERA_FROM_LOCAL.T)),
            translation=tuple(float(t) for t in centre),
            scale=(scale,) * 3,
        )
        return ObjectReconstruction(gaussians=gaussians, mesh=mesh, pose=pose,
                                    notes=["demo backend: a relief of the photo's pixels, not a reconstruction"])


def _grid_faces(grid: np.ndarray) -> np.ndarray:
    """(F, 3) triangles over the True cells of an (h, w) bool grid, vertices numbered in ``grid``'s row-major
    True order; two per 2×2 block whose corners are all True, wound to face the camera."""
    index = np.full(grid.shape, -1, np.int64)
    index[grid] = np.arange(int(grid.sum()))
    a, b = index[:-1, :-1], index[:-1, 1:]
    c, d = index[1:, :-1], index[1:, 1:]
    full = (a >= 0) & (b >= 0) & (c >= 0) & (d >= 0)
    first = np.stack([a[full], c[full], b[full]], 1)
    second = np.stack([b[full], c[full], d[full]], 1)
    return np.concatenate([first, second]).reshape(-1, 3)
