"""Assembly of a successful task's results from an engine analysis (contract §6 and §7).

:func:`build_results` turns the engine's measurements into

- the ``format=json`` entries, with mask *file names* where the URLs go (the server signs fresh
  URLs on every poll);
- the ``score_info.json`` object of the ZIP;
- the rendered files: one mask per (concern, region) and ``resize_image.jpg``.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, MutableMapping, Sequence

import numpy as np

from ..actions import CATALOGUE, DARK_BACKGROUND_CONCERNS, Action
from .render import CONCERN_COLOURS, encode_jpeg, encode_mask, parse_hex_colour

__all__ = ["RESIZE_IMAGE", "TaskResults", "build_results", "output_order", "json_number"]

RESIZE_IMAGE = "resize_image.jpg"
DEFAULT_BACKGROUND_COLOUR = "3D3D3D"
#: HD concerns whose score_info value is nested by region even with one region (§7.3).
_NESTED_SINGLE = frozenset({"hd_acne", "hd_texture"})


@dataclass
class TaskResults:
    """Everything a successful task serves."""

    entries: list[dict[str, Any]]        # format=json entries; "mask_urls" holds file names
    score_info: dict[str, Any]
    files: list[tuple[str, bytes]] = field(default_factory=list)   # masks then resize_image.jpg


def json_number(value: float) -> float | int:
    """A score as the JSON output writes it: whole numbers as integers (§6.2)."""
    value = float(value)
    return int(value) if value.is_integer() else value


def output_order(names: Sequence[str], task_id: str) -> list[str]:
    """Scored concerns in a pseudo-random order seeded by ``task_id``, then skin type (§6.2).

    With two or more scored concerns the order never equals the request order.
    """
    scored = [n for n in names if CATALOGUE[n].scored]
    rng = random.Random(hashlib.sha256(task_id.encode("utf-8")).digest())
    shuffled = scored[:]
    rng.shuffle(shuffled)
    if len(shuffled) > 1 and shuffled == scored:
        shuffled = shuffled[1:] + shuffled[:1]
    return shuffled + [n for n in names if not CATALOGUE[n].scored]


def _regions(action: Action) -> list[str]:
    """Output order of regions: named regions first, ``whole`` last (as the service sends them)."""
    if action.concern == "skin_type":
        return list(action.regions)
    return [r for r in action.regions if r != "whole"] + (["whole"] if "whole" in action.regions else [])


def _background(action: Action, args: Mapping[str, Any]) -> tuple[tuple[int, int, int], float] | None:
    name = action.name
    if name not in DARK_BACKGROUND_CONCERNS or args.get(f"enable_dark_background_{name}") is not True:
        return None
    colour = args.get(f"color_dark_background_{name}", DEFAULT_BACKGROUND_COLOUR)
    opacity = args.get(f"opacity_dark_background_{name}", DARK_BACKGROUND_CONCERNS[name])
    return parse_hex_colour(colour), float(opacity)


def build_results(names: Sequence[str], analysis: Any, image: np.ndarray, *, task_id: str,
                  miniserver_args: Mapping[str, Any], ui_score: Callable[[float], int],
                  render_masks: bool = True, cache: MutableMapping[Any, bytes] | None = None) -> TaskResults:
    """Build the results of one task.

    Parameters
    ----------
    names : action names, deduplicated, in request order (one tier).
    analysis : the engine's ``Analysis`` (``concerns`` by tier-free key, ``skin_age``).
    image : the upright, resized source (H×W×3 uint8); masks are rendered at its size.
    task_id : seeds the output order.
    miniserver_args : the validated ``miniserver_args`` (overlay, dark backgrounds).
    ui_score : the engine's raw → ui mapping.
    render_masks : False skips the pixel work (files stays empty).
    cache : rendered files by (file name, background), shared by tasks on the same analysis.
    """
    overlay = miniserver_args.get("enable_mask_overlay") is True
    height, width = image.shape[:2]
    entries: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    files: list[tuple[str, bytes]] = []
    whole_ui: list[int] = []

    for name in output_order(names, task_id):
        action = CATALOGUE[name]
        measured = analysis.concerns[action.concern]
        regions = _regions(action)
        background = _background(action, miniserver_args)
        per_region: dict[str, Any] = {}
        for region in regions:
            mask_name = action.mask_file(region, overlay=overlay)
            if action.scored:
                raw = float(measured.scores[region])
                ui = int(ui_score(raw))
                if region == "whole":
                    whole_ui.append(ui)
                entry: dict[str, Any] = {"type": name}
                if action.is_hd:
                    entry["region"] = region
                entry.update(raw_score=json_number(raw), ui_score=ui)
                per_region[region] = {"raw_score": raw, "ui_score": ui, "output_mask_name": mask_name}
            else:
                label = measured.skin_types[region]
                entry = {"type": name, "region": region, "skin_type": label}
                per_region[region] = {"skin_type": label, "output_mask_name": mask_name}
            entry["mask_urls"] = [mask_name]
            entry["url"] = None
            entries.append(entry)
            if render_masks:
                blob = cache.get((mask_name, background)) if cache is not None else None
                if blob is None:
                    mask = measured.masks.get(region)
                    alpha = mask.full((height, width)) if mask is not None else np.zeros((height, width), np.uint8)
                    blob = encode_mask(alpha, CONCERN_COLOURS[action.concern], background=background,
                                       overlay_on=image if overlay else None)
                    if cache is not None:
                        cache[(mask_name, background)] = blob
                files.append((mask_name, blob))
        nested = action.concern == "skin_type" or (action.is_hd and (len(regions) > 1 or name in _NESTED_SINGLE))
        info[name] = per_region if nested else per_region["whole"]

    if whole_ui:
        overall = sum(whole_ui) / len(whole_ui)
        entries.append({"type": "all", "score": json_number(overall), "url": None})
        info["all"] = {"score": float(overall)}
    skin_age = int(analysis.skin_age)
    entries.append({"type": "skin_age", "score": skin_age, "url": None})
    entries.append({"type": "resize_image", "mask_urls": [RESIZE_IMAGE], "url": None})
    info["skin_age"] = skin_age
    info["resize_image"] = {"image_name": RESIZE_IMAGE}
    if render_masks:
        blob = cache.get((RESIZE_IMAGE, None)) if cache is not None else None
        if blob is None:
            blob = encode_jpeg(image)
            if cache is not None:
                cache[(RESIZE_IMAGE, None)] = blob
        files.append((RESIZE_IMAGE, blob))
    return TaskResults(entries=entries, score_info=info, files=files)
