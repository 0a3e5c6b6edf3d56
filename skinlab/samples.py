"""Real public-domain portraits that ship inside scikit-image and matplotlib, made API-ready.

* ``"astronaut"``: Eileen Collins, NASA (``skimage.data.astronaut()``), 512x512.
* ``"grace_hopper"``: Grace Hopper, US Navy (matplotlib's ``grace_hopper.jpg``), 512x600.

Uncropped, both faces are far smaller than the service requires (the face must span more than
60% of the image width), so they are cropped around the face found by the local engine to a 3:4
portrait with the face at ``face_fraction`` of the width, then upscaled with Lanczos to meet the
tier's minimum short side. Upscaling adds no detail: fine-texture measurements on these are not
meaningful, colour and geometry are.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLES", "load_original", "sample_portrait"]

SAMPLES = ("astronaut", "grace_hopper")
_TARGET_WIDTH = {"sd": 600, "hd": 1080}


def load_original(name: str):
    """The bundled photo as an RGB PIL image, uncropped."""
    from PIL import Image

    if name == "astronaut":
        try:
            from skimage import data
        except ImportError as exc:  # pragma: no cover
            raise ImportError("The astronaut sample needs scikit-image: pip install 'skinlab[local]'") from exc
        return Image.fromarray(data.astronaut()).convert("RGB")
    if name == "grace_hopper":
        try:
            from matplotlib import cbook
        except ImportError as exc:  # pragma: no cover
            raise ImportError("The grace_hopper sample needs matplotlib: pip install 'skinlab[notebook]'") from exc
        with cbook.get_sample_data("grace_hopper.jpg") as fh:
            img = Image.open(fh)
            img.load()
        return img.convert("RGB")
    raise ValueError(f"Unknown sample {name!r}; choose one of {', '.join(SAMPLES)}")


def sample_portrait(name: str = "astronaut", tier: str = "sd", *, crop: bool = True, face_fraction: float = 0.7):
    """A bundled portrait ready for analysis (or uncropped with ``crop=False``).

    Parameters
    ----------
    name : {"astronaut", "grace_hopper"}
    tier : {"sd", "hd"}
        SD gives 600x800, HD 1080x1440.
    crop : bool
        False returns the original, which the service rejects with ``error_src_face_too_small``.
    face_fraction : float
        The face width as a fraction of the crop width.
    """
    import numpy as np
    from PIL import Image

    img = load_original(name)
    if not crop:
        return img
    from .local import engine

    faces = engine.detect_faces(np.asarray(img))
    if not faces:  # pragma: no cover - both samples have a detectable face
        raise RuntimeError(f"No face found in the {name} sample")
    f = faces[0]
    cw = f.width / face_fraction
    ch = cw * 4 / 3
    cx = f.left + f.width / 2
    cy = f.top + f.height * 0.45
    left = min(max(0.0, cx - cw / 2), img.width - cw)
    top = min(max(0.0, cy - ch / 2), img.height - ch)
    box = tuple(int(round(v)) for v in (left, top, left + cw, top + ch))
    target_w = _TARGET_WIDTH[tier]
    return img.crop(box).resize((target_w, round(target_w * 4 / 3)), Image.LANCZOS)


def save_sample(name: str, path: str | Path, tier: str = "sd", **kw) -> Path:
    """Write :func:`sample_portrait` as a JPEG (quality 95) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_portrait(name, tier, **kw).save(path, format="JPEG", quality=95)
    return path
