"""The teacher's QC figure: does the DWI sit on the T1w, and do the masks hold?"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from m2m_app.io.files import atomic_write
from m2m_app.maths.orientation import ras_zooms, to_ras


def registration_figure(
    t1w: np.ndarray, affine: np.ndarray, b0: np.ndarray, fa: np.ndarray, wm: np.ndarray, fov: np.ndarray, path: Path
) -> Path:
    """Write a PNG of three orthogonal T1w slices with the registered DWI drawn over them.

    Parameters
    ----------
    t1w, b0, fa : ``(X, Y, Z)`` volumes on the T1w grid (b0 and FA brought over from the DWI).
    wm, fov : boolean masks on the T1w grid: white matter (from the T1w) and where the DWI
        was measured.
    affine : the T1w grid's voxel-to-world matrix.

    Drawn: the b0's edges (cyan contour at half its median in the field of view), FA > 0.3
    (red), the white-matter mask (yellow) and the DWI field of view (white, dashed), on
    slices through the centre of the measured white matter. A failed registration shows
    as cyan and red lines off the T1w's anatomy.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    volumes = {
        name: to_ras(np.asarray(v, dtype=np.float32), affine)
        for name, v in {"t1w": t1w, "b0": b0, "fa": fa, "wm": wm, "fov": fov}.items()
    }
    zooms = ras_zooms(affine)
    target = volumes["wm"] * volumes["fov"] > 0
    # the centre in the RAS-ordered arrays (the input's own axis order may differ)
    centre = np.round(np.argwhere(target).mean(axis=0) if target.any() else np.array(volumes["t1w"].shape) / 2).astype(
        int
    )
    level = 0.5 * float(np.median(volumes["b0"][volumes["fov"] > 0])) if np.any(volumes["fov"] > 0) else 0.0
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), facecolor="black")
    for ax, axis, title in zip(axes, (0, 1, 2), ("sagittal", "coronal", "axial")):
        index: list[slice | int] = [slice(None)] * 3
        index[axis] = int(np.clip(centre[axis], 0, volumes["t1w"].shape[axis] - 1))
        cut = {name: v[tuple(index)].T for name, v in volumes.items()}
        other = [a for a in range(3) if a != axis]
        aspect = zooms[other[1]] / zooms[other[0]]
        brain = cut["t1w"][cut["fov"] > 0] if np.any(cut["fov"] > 0) else cut["t1w"]
        ax.imshow(
            cut["t1w"],
            cmap="gray",
            origin="lower",
            aspect=aspect,
            vmin=0,
            vmax=np.percentile(brain, 99.5) if brain.size else None,
        )
        for name, value, colour, style in (
            ("b0", level, "cyan", "solid"),
            ("fa", 0.3, "red", "solid"),
            ("wm", 0.5, "yellow", "solid"),
            ("fov", 0.5, "white", "dashed"),
        ):
            if np.ptp(cut[name]) > 0 and cut[name].min() < value < cut[name].max():
                ax.contour(cut[name], [value], colors=colour, linewidths=0.6, linestyles=style)
        ax.set_title(title, color="white")
        ax.axis("off")
    fig.suptitle(
        "b0 edges (cyan), FA > 0.3 (red), white matter (yellow), DWI field of view (dashed)", color="white", fontsize=10
    )
    fig.tight_layout()

    def writer(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=90, facecolor="black")

    try:
        return atomic_write(Path(path), writer)
    finally:
        plt.close(fig)
