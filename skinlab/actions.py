"""The catalogue of the 32 skin-analysis actions, and validation of task options.

Everything here is pure data and pure functions: no I/O, no network. The tables follow
``api-contract.md`` §4.2 (names, regions, mask files), §4.3 (``miniserver_args``) and §8.2
(unit tiers).

Each action is one *concern* (``"wrinkle"``, ``"pore"``, ...) in one *tier* (``"hd"`` or
``"sd"``). The concern key is the tier-free name used by the local engine; it equals the SD
name except for dark circles, whose SD name is ``dark_circle_v2``.
"""

from __future__ import annotations

import difflib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

from .errors import InvalidParametersError

__all__ = [
    "Action",
    "CATALOGUE",
    "COLOUR_CONCERNS",
    "CONCERNS",
    "DARK_BACKGROUND_CONCERNS",
    "FORMATS",
    "HD_ACTIONS",
    "SD_ACTIONS",
    "SKIN_TYPES",
    "UNIT_TIERS",
    "ValidatedActions",
    "colour_actions",
    "estimate_units",
    "get_action",
    "resolve_actions",
    "validate_actions",
    "validate_format",
    "validate_miniserver_args",
]


@dataclass(frozen=True)
class Action:
    """One analysis action of the service.

    Attributes
    ----------
    name : str
        The name sent in ``dst_actions`` (``"hd_wrinkle"``, ``"dark_circle_v2"``, ...).
    tier : {"hd", "sd"}
    concern : str
        The tier-free concern key (``"wrinkle"``, ``"dark_circle"``, ...).
    label : str
        The concern as people say it ("Dark circles").
    measures : str
        One line on what the concern measures.
    regions : tuple of str
        The ``region`` values reported for this action (``("whole",)`` for most).
    mask_files : tuple of str
        The mask file names, one per region, in the order of ``regions``.
    scored : bool
        False only for skin type, which is a category with no score.
    """

    name: str
    tier: str
    concern: str
    label: str
    measures: str
    regions: tuple[str, ...]
    mask_files: tuple[str, ...]
    scored: bool = True

    @property
    def is_hd(self) -> bool:
        return self.tier == "hd"

    def mask_file(self, region: str = "whole", *, overlay: bool = False) -> str:
        """The mask file name of ``region`` (``.jpg`` when the overlay is enabled)."""
        try:
            name = self.mask_files[self.regions.index(region)]
        except ValueError:
            raise InvalidParametersError(
                f"{self.name} has no region {region!r}; its regions are {', '.join(self.regions)}"
            ) from None
        return name[:-4] + ".jpg" if overlay else name


# concern key, label, what it measures, HD regions (None: whole only)
_CONCERNS: list[tuple[str, str, str, tuple[str, ...] | None]] = [
    ("wrinkle", "Wrinkles", "lines and wrinkles",
     ("whole", "forehead", "glabellar", "crowfeet", "periocular", "nasolabial", "marionette")),
    ("pore", "Pores", "visible pores", ("whole", "forehead", "nose", "cheek")),
    ("texture", "Texture", "roughness of the skin surface", None),
    ("acne", "Acne", "acne and blemishes", None),
    ("oiliness", "Oiliness", "sebum and shine", None),
    ("radiance", "Radiance", "brightness and glow", None),
    ("eye_bag", "Eye bags", "bags under the eyes", None),
    ("age_spot", "Age spots", "pigmented spots", None),
    ("dark_circle", "Dark circles", "dark circles under the eyes", None),
    ("droopy_upper_eyelid", "Droopy upper eyelid", "sagging upper eyelid", None),
    ("droopy_lower_eyelid", "Droopy lower eyelid", "sagging lower eyelid", None),
    ("firmness", "Firmness", "firmness and sagging", None),
    ("moisture", "Moisture", "hydration", None),
    ("redness", "Redness", "redness and irritation", None),
    ("tear_trough", "Tear trough", "hollows under the eyes", None),
    ("skin_type", "Skin type", "skin type, a category with no score", ("whole", "t_zone", "u_zone")),
]

#: Tier-free concern keys, in catalogue order.
CONCERNS: tuple[str, ...] = tuple(c[0] for c in _CONCERNS)
#: Concerns measured from colour (CIELAB a*, b*, hue): a greyscale photo cannot give them.
COLOUR_CONCERNS: tuple[str, ...] = ("redness", "acne", "age_spot", "dark_circle", "radiance")

#: The documented skin-type categories (§6.1).
SKIN_TYPES: tuple[str, ...] = (
    "Normal", "Oily", "Dry", "Combination", "Redness",
    "Dry & Redness", "Oily & Redness", "Combination & Redness",
)

FORMATS: tuple[str, ...] = ("zip", "json")

#: Units per task by number of distinct concerns (§8.2): (max concerns, SD units, HD units).
UNIT_TIERS: tuple[tuple[int, int, int], ...] = ((4, 9, 12), (8, 12, 16), (12, 14, 20), (16, 16, 22))

#: Concerns whose mask may get a tinted background (§4.3), with the default opacity.
DARK_BACKGROUND_CONCERNS: dict[str, float] = {
    "hd_pore": 0.4, "hd_wrinkle": 0.4, "hd_acne": 0.4, "hd_texture": 0.4,
    "hd_oiliness": 0.2, "hd_age_spot": 0.2, "hd_redness": 0.2, "hd_firmness": 0.1,
}


def _sd_name(concern: str) -> str:
    return "dark_circle_v2" if concern == "dark_circle" else concern


def _masks(name: str, tier: str, concern: str, regions: tuple[str, ...]) -> tuple[str, ...]:
    if concern == "skin_type":
        return tuple(f"{name}_output.png" if r == "whole" else f"{name}_{r}_output.png" for r in regions)
    if tier == "hd" and len(regions) > 1:
        return tuple(f"{name}_output_{'all' if r == 'whole' else r}.png" for r in regions)
    return (f"{name}_output.png",)


def _build() -> dict[str, Action]:
    table: dict[str, Action] = {}
    for tier in ("hd", "sd"):
        for concern, label, measures, hd_regions in _CONCERNS:
            name = f"hd_{concern}" if tier == "hd" else _sd_name(concern)
            if concern == "skin_type":
                regions = ("whole", "t_zone", "u_zone")
            elif tier == "hd" and hd_regions:
                regions = hd_regions
            else:
                regions = ("whole",)
            table[name] = Action(
                name=name, tier=tier, concern=concern, label=label, measures=measures,
                regions=regions, mask_files=_masks(name, tier, concern, regions),
                scored=concern != "skin_type",
            )
    return table


#: All 32 actions by name.
CATALOGUE: dict[str, Action] = _build()
HD_ACTIONS: tuple[str, ...] = tuple(n for n, a in CATALOGUE.items() if a.tier == "hd")
SD_ACTIONS: tuple[str, ...] = tuple(n for n, a in CATALOGUE.items() if a.tier == "sd")


def get_action(name: str) -> Action:
    """Return the :class:`Action` called ``name``, or raise with the closest known name."""
    try:
        return CATALOGUE[name]
    except (KeyError, TypeError):
        raise InvalidParametersError(_unknown_message("action", name, CATALOGUE)) from None


def _closest(name: object, known: Iterable[str]) -> str | None:
    if not isinstance(name, str):
        return None
    cleaned = name.strip().lower()
    known = list(known)
    if cleaned in known:
        return cleaned
    # A trailing "_v2" on an HD name is a common slip (hd_dark_circle_v2).
    if cleaned.endswith("_v2") and cleaned[:-3] in known:
        return cleaned[:-3]
    match = difflib.get_close_matches(cleaned, known, n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown_message(kind: str, name: object, known: Iterable[str]) -> str:
    guess = _closest(name, known)
    hint = f" Did you mean {guess!r}?" if guess else ""
    return f"Unknown {kind} {name!r}.{hint} Run `skinlab actions` to list them."


def _unknown_action_message(name: str, tiers: set[str]) -> str:
    """The unknown-action error, suggesting a name of the tier the other names use (so that the
    suggestion does not then fail as an HD/SD mix); a bare concern key gets its action name."""
    tier = next(iter(tiers)) if len(tiers) == 1 else None
    cleaned = name.strip().lower()
    if tier is not None and cleaned.removeprefix("hd_").removesuffix("_v2") in CONCERNS:
        concern = cleaned.removeprefix("hd_").removesuffix("_v2")
        guess = f"hd_{concern}" if tier == "hd" else _sd_name(concern)
    else:
        guess = _closest(name, [n for n, a in CATALOGUE.items() if tier is None or a.tier == tier])
    hint = f" Did you mean {guess!r}?" if guess else ""
    return f"Unknown action {name!r}.{hint} Run `skinlab actions` to list them."


@dataclass(frozen=True)
class ValidatedActions:
    """Actions after validation: names in request order, duplicates dropped."""

    names: tuple[str, ...]
    tier: str

    @property
    def actions(self) -> tuple[Action, ...]:
        return tuple(CATALOGUE[n] for n in self.names)

    @property
    def units(self) -> int:
        return estimate_units(self.names)


def _clean_name(item: object) -> object:
    """An action name or concern key as the catalogue spells it: stripped and lower-cased
    (anything that is not a string is left for validation to refuse)."""
    return item.strip().lower() if isinstance(item, str) else item


def resolve_actions(spec: str | Iterable[str], *, hd: bool = False) -> list[str]:
    """Turn a user's shorthand into action names.

    ``spec`` may be a comma-separated string or a list. Each item is an action name or a
    concern key (``"wrinkle"``, ``"dark_circle"``), which is mapped to the HD or SD name
    according to ``hd``. ``"all"`` means all 16 concerns of the tier. Names are matched
    case-insensitively and surrounding whitespace is ignored (``" Wrinkle"`` is ``"wrinkle"``).
    The result is not yet validated; pass it to :func:`validate_actions`.
    """
    if isinstance(spec, str):
        items = spec.split(",")
    else:
        try:
            items = list(spec)
        except TypeError:
            raise InvalidParametersError(
                f"actions must be 'all', a comma-separated string or a list of concern or action names "
                f"(e.g. 'wrinkle,pore' or ['redness']), not {type(spec).__name__}") from None
    names: list[str] = []
    for raw in items:
        item = _clean_name(raw)
        if item == "":
            continue
        if item == "all":
            names.extend(HD_ACTIONS if hd else SD_ACTIONS)
        elif isinstance(item, str) and item in CONCERNS and item not in CATALOGUE:
            names.append(f"hd_{item}" if hd else _sd_name(item))
        elif hd and isinstance(item, str) and item in CATALOGUE and not item.startswith("hd_"):
            names.append("hd_" + CATALOGUE[item].concern)
        elif isinstance(item, str) and item in CATALOGUE:
            names.append(item)
        else:
            names.append(raw.strip() if isinstance(raw, str) else raw)  # as typed, for the error message
    return names


def validate_actions(actions: str | Iterable[str]) -> ValidatedActions:
    """Check a list of action names before any network call.

    Names are matched case-insensitively and surrounding whitespace is ignored; the result holds
    them as the catalogue spells them.

    Raises
    ------
    InvalidParametersError
        For an empty list, a name that is not a string, an unknown name (the message
        suggests the closest known one), or HD and SD names mixed.

    Warns
    -----
    UserWarning
        When duplicates are dropped (the service would also count each concern once).
    """
    if isinstance(actions, str):
        actions = [a for a in actions.split(",") if a.strip()]
    try:
        given = list(actions)
    except TypeError:
        raise InvalidParametersError(
            f"actions must be a list of action names, not {type(actions).__name__}"
        ) from None
    items = [_clean_name(a) for a in given]
    if not items:
        raise InvalidParametersError(
            "No actions given. Pick at least one, e.g. ['wrinkle', 'pore'] (SD) or ['hd_wrinkle'] (HD); "
            "`skinlab actions` lists all 32."
        )
    names: list[str] = []
    dropped: list[str] = []
    known_tiers = {CATALOGUE[i].tier for i in items if isinstance(i, str) and i in CATALOGUE}
    for raw, item in zip(given, items):
        if not isinstance(item, str):
            raise InvalidParametersError(f"Action names must be strings, got {item!r}")
        if item not in CATALOGUE:
            raise InvalidParametersError(_unknown_action_message(raw.strip(), known_tiers))
        if item in names:
            dropped.append(item)
        else:
            names.append(item)
    if dropped:
        warnings.warn(f"Duplicate actions dropped: {', '.join(dropped)}", UserWarning, stacklevel=2)
    tiers = {CATALOGUE[n].tier for n in names}
    if len(tiers) > 1:
        hd = [n for n in names if CATALOGUE[n].tier == "hd"]
        sd = [n for n in names if CATALOGUE[n].tier == "sd"]
        raise InvalidParametersError(
            f"Cannot mix HD and SD actions in one task (HD: {', '.join(hd)}; SD: {', '.join(sd)}). "
            "Use all hd_* names or none."
        )
    return ValidatedActions(names=tuple(names), tier=tiers.pop())


def colour_actions(actions: Iterable[str]) -> list[str]:
    """The action names among ``actions`` whose concern is measured from colour
    (:data:`COLOUR_CONCERNS`), in their order; names not in the catalogue are left out."""
    return [n for n in actions if n in CATALOGUE and CATALOGUE[n].concern in COLOUR_CONCERNS]


def estimate_units(actions: Iterable[str]) -> int:
    """Units one successful task with these actions costs (§8.2); duplicates count once."""
    validated = validate_actions(list(dict.fromkeys(actions)))
    n = len(validated.names)
    for limit, sd, hd in UNIT_TIERS:
        if n <= limit:
            return hd if validated.tier == "hd" else sd
    raise InvalidParametersError(f"At most 16 distinct concerns fit in one task, got {n}")  # pragma: no cover


def validate_format(value: str) -> str:
    """Return ``value`` if it is ``"zip"`` or ``"json"``, else raise."""
    if value in FORMATS:
        return value
    guess = _closest(value, FORMATS)
    hint = f" Did you mean {guess!r}?" if guess else ""
    raise InvalidParametersError(f"format must be 'zip' or 'json', got {value!r}.{hint}")


_HEX = re.compile(r"^[0-9A-Fa-f]{6}$")


def _known_miniserver_keys() -> list[str]:
    keys = ["enable_mask_overlay"]
    for c in DARK_BACKGROUND_CONCERNS:
        keys += [f"enable_dark_background_{c}", f"color_dark_background_{c}", f"opacity_dark_background_{c}"]
    return keys


def validate_miniserver_args(args: Mapping[str, object] | None) -> dict[str, object]:
    """Check ``miniserver_args`` (§4.3) and return a normalised copy.

    Colours may be given with a leading ``#``; it is removed. An unknown key is an error that
    names the closest known key, so a typo never passes silently (the service would ignore
    it). Returns ``{}`` for ``None``.
    """
    if args is None:
        return {}
    if not isinstance(args, Mapping):
        raise InvalidParametersError(f"miniserver_args must be a dict, got {type(args).__name__}")
    known = _known_miniserver_keys()
    out: dict[str, object] = {}
    for key, value in args.items():
        if key not in known:
            raise InvalidParametersError(_unknown_message("miniserver_args key", key, known))
        if key.startswith("enable_"):
            if not isinstance(value, bool):
                raise InvalidParametersError(f"miniserver_args[{key!r}] must be True or False, got {value!r}")
        elif key.startswith("color_"):
            text = value[1:] if isinstance(value, str) and value.startswith("#") else value
            if not isinstance(text, str) or not _HEX.match(text):
                raise InvalidParametersError(
                    f"miniserver_args[{key!r}] must be 6 hex digits such as '3D3D3D', got {value!r}"
                )
            value = text.upper()
        elif key.startswith("opacity_"):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not 0 <= value <= 1):
                raise InvalidParametersError(
                    f"miniserver_args[{key!r}] must be a number from 0 to 1, got {value!r}"
                )
        out[key] = value
    return out
