"""What every number in ``ConcernMeasurement.measurements`` is: quantity, region, unit, kind.

The measurement functions keep their flat ``{name: value}`` dicts (the emulator, the tests and
pickled results rely on them); this module declares, per concern and per exact name, the
physical quantity, the region it was measured on and its unit. Nothing is parsed out of the
names: a name that is not declared here has no unit, and the test suite checks that every name
the engine emits on real portraits (landmarks and cascade fallback, pores resolvable or not) is
declared. :func:`records` pairs a measurement's values with their declarations;
``skinlab.local.measure`` turns those into a tidy table.
"""

from __future__ import annotations

from dataclasses import dataclass

from skinlab.actions import CATALOGUE

__all__ = ["Quantity", "UNITS", "KINDS", "QUANTITIES", "ALIASES", "NOT_RESOLVABLE", "describe",
           "records"]

#: unit -> what it means (the only units a quantity may have)
UNITS: dict[str, str] = {
    "mm": "millimetres, from the iris scale (11.7 mm visible iris diameter)",
    "mm/cm²": "millimetres of line per square centimetre of skin",
    "cm²": "square centimetres of skin",
    "1/cm²": "count per square centimetre of skin",
    "1/10 cm²": "count per 10 square centimetres of skin",
    "px/mm": "image pixels per millimetre",
    "L*": "CIELAB lightness (D65), 0-100",
    "a*": "CIELAB red-green coordinate (positive = red), white-balanced unless named uncorrected",
    "b*": "CIELAB yellow-blue coordinate (positive = yellow)",
    "ΔL*": "a difference, contrast, depth or standard deviation of CIELAB L*",
    "Δa*": "a difference of CIELAB a*",
    "Δb*": "a difference of CIELAB b*",
    "Δa*b*": "a distance in the CIELAB a*-b* plane",
    "EI": "erythema index, 100 x log10(linear R / linear G)",
    "%": "percent of the named region's skin pixels",
    "°": "degrees",
    "count": "a number of detected objects",
    "ratio": "a dimensionless ratio",
    "0-1": "a dimensionless score between 0 and 1",
    "score 1-100": "an engine raw score (higher = healthier)",
    "index": "a documented dimensionless combination of other rows (see docs/engine-methods.md)",
    "flag": "1 = yes, 0 = no",
    "category": "one of the service's categories, given in the category column (value empty)",
}

#: kind -> meaning
KINDS: dict[str, str] = {
    "measurement": "a physical measurement of the skin",
    "index": "the combination of measurements the score is mapped from",
    "flag": "a yes/no finding or condition",
    "diagnostic": "how the measurement was made (scale, noise, thresholds, white balance, areas)",
}


@dataclass(frozen=True)
class Quantity:
    """The declaration of one measurement name."""

    key: str            # the name in ConcernMeasurement.measurements
    quantity: str       # what is measured, e.g. "wrinkle_length_density"
    region: str         # where: an HD region name, "whole", "t_zone", "under_eye_image_left", ...
    unit: str           # one of UNITS
    kind: str = "measurement"   # one of KINDS
    description: str = ""


def _regions(concern: str) -> tuple[str, ...]:
    return CATALOGUE["hd_" + concern].regions


QUANTITIES: dict[str, dict[str, Quantity]] = {}
#: names that repeat another name's value (kept for compatibility): concern -> {alias: key}
ALIASES: dict[str, dict[str, str]] = {}
#: per concern: quantities that are not reported when the image's scale cannot resolve them
#: (``measure()`` gives them as empty values flagged not resolvable, never as invented numbers)
NOT_RESOLVABLE: dict[str, tuple[str, ...]] = {}


def _add(concern: str, key: str, quantity: str, region: str, unit: str, kind: str = "measurement",
         description: str = "") -> None:
    assert unit in UNITS, (key, unit)
    assert kind in KINDS, (key, kind)
    table = QUANTITIES.setdefault(concern, {})
    assert key not in table, key
    table[key] = Quantity(key, quantity, region, unit, kind, description)


def _per_region(concern: str, prefix: str, quantity: str, unit: str, kind: str = "measurement",
                description: str = "") -> None:
    for region in _regions(concern):
        _add(concern, f"{prefix}_{region}", quantity, region, unit, kind, description)


def _sides(concern: str, base: str, quantity: str, region: str, unit: str, kind: str = "measurement",
           description: str = "") -> None:
    """``base`` (mean of both sides) and ``base_image_left`` / ``base_image_right`` (one eye:
    ``eye_image_left``; image left is the subject's right)."""
    _add(concern, base, quantity, region, unit, kind, description)
    one = "eye" if region == "eyes" else region
    for side in ("image_left", "image_right"):
        _add(concern, f"{base}_{side}", quantity, f"{one}_{side}", unit, kind, description + f" ({side})")


# --- wrinkle -------------------------------------------------------------------------------
_per_region("wrinkle", "wrinkle_len_mm_per_cm2", "wrinkle_length_density", "mm/cm²",
            description="skeleton length of the kept dark lines per skin area")
_per_region("wrinkle", "wrinkle_depth_l_star", "wrinkle_depth", "ΔL*",
            description="median valley depth along the lines")
_per_region("wrinkle", "wrinkle_count", "wrinkle_count", "count", description="connected lines")
_per_region("wrinkle", "skin_area_cm2", "skin_area", "cm²", "diagnostic", "skin measured in the region")
ALIASES["wrinkle"] = {"wrinkle_len_mm_per_cm2": "wrinkle_len_mm_per_cm2_whole"}
_add("wrinkle", "ridge_threshold_l_star", "ridge_threshold", "whole", "ΔL*", "diagnostic",
     "hysteresis high threshold of the line filter, from the image's noise")
_add("wrinkle", "working_px_per_mm", "working_scale", "whole", "px/mm", "diagnostic")
_add("wrinkle", "fine_lines_resolvable", "fine_lines_resolvable", "whole", "flag", "flag")

# --- pore ----------------------------------------------------------------------------------
_add("pore", "pore_resolvable", "pore_resolvable", "whole", "flag", "flag",
     "1 when the image has at least pore_min_scale pixels per mm")
_add("pore", "pore_min_px_per_mm", "pore_min_scale", "whole", "px/mm", "diagnostic")
_add("pore", "px_per_mm", "image_scale", "whole", "px/mm", "diagnostic")
_per_region("pore", "pore_count", "pore_count", "count")
_per_region("pore", "pore_density_per_cm2", "pore_density", "1/cm²")
_per_region("pore", "pore_mean_diameter_mm", "pore_mean_diameter", "mm", description="FWHM diameter")
_per_region("pore", "pore_mean_depth_l_star", "pore_mean_depth", "ΔL*")
_per_region("pore", "skin_area_cm2", "skin_area", "cm²", "diagnostic")
_per_region("pore", "pore_proxy_dark_blob_contrast_l_star", "pore_proxy_dark_blob_contrast", "ΔL*",
            description="coarser-scale proxy used when pores are not resolvable")
_add("pore", "pore_proxy_scale_mm", "pore_proxy_scale", "whole", "mm", "diagnostic")
_add("pore", "working_px_per_mm", "working_scale", "whole", "px/mm", "diagnostic")
NOT_RESOLVABLE["pore"] = tuple(f"{p}_{r}" for p in ("pore_count", "pore_density_per_cm2", "pore_mean_diameter_mm",
                                                    "pore_mean_depth_l_star") for r in _regions("pore"))

# --- texture -------------------------------------------------------------------------------
_add("texture", "roughness_l_star", "roughness", "whole", "ΔL*", "measurement",
     "band-pass std of L* with the noise's share removed")
_add("texture", "bandpass_l_star_std", "bandpass_std", "whole", "ΔL*", "diagnostic", "before noise removal")
_add("texture", "noise_l_star", "noise_level", "whole", "ΔL*", "diagnostic", "Immerkaer estimate")
_add("texture", "noise_in_band_l_star", "noise_in_band", "whole", "ΔL*", "diagnostic")
_add("texture", "texture_snr", "signal_to_noise", "whole", "ratio", "diagnostic")
_add("texture", "working_px_per_mm", "working_scale", "whole", "px/mm", "diagnostic")

# --- age spots and acne ----------------------------------------------------------------------
_add("age_spot", "spot_count", "spot_count", "whole", "count")
_add("age_spot", "spot_area_fraction_pct", "spot_area_fraction", "whole", "%")
_add("age_spot", "spots_per_10cm2", "spot_density", "whole", "1/10 cm²")
_add("age_spot", "spot_mean_diameter_mm", "spot_mean_diameter", "whole", "mm")
_add("age_spot", "spot_mean_darkness_l_star", "spot_mean_darkness", "whole", "ΔL*",
     description="below the local background, exposure-normalised to skin of L* 65")
_add("age_spot", "spot_threshold_l_star", "spot_threshold", "whole", "ΔL*", "diagnostic")
_add("acne", "lesion_count", "lesion_count", "whole", "count")
_add("acne", "lesion_area_fraction_pct", "lesion_area_fraction", "whole", "%")
_add("acne", "lesions_per_10cm2", "lesion_density", "whole", "1/10 cm²")
_add("acne", "lesion_mean_delta_a_star", "lesion_mean_redness", "whole", "Δa*",
     description="a* above the local background")
_add("acne", "lesion_weighted_count", "weighted_lesion_count", "whole", "count", "index",
     "sum over lesions of min(1, (Δa* − 6) / 4): the count the score uses")

# --- colour ----------------------------------------------------------------------------------
_add("redness", "a_star_mean", "a_star_mean", "central_face", "a*", description="cheeks, nose and chin skin")
_add("redness", "a_star_p90", "a_star_p90", "central_face", "a*")
for _r in ("cheek", "nose", "chin", "forehead"):
    _add("redness", f"a_star_{_r}", "a_star_mean", _r, "a*")
_add("redness", "erythema_index_mean", "erythema_index", "central_face", "EI")
_add("redness", "red_area_fraction_pct", "red_area_fraction", "central_face", "%", description="a* > 18")
_add("redness", "skin_area_cm2", "skin_area", "central_face", "cm²", "diagnostic")
_add("redness", "a_star_mean_uncorrected", "a_star_mean_uncorrected", "central_face", "a*", "diagnostic",
     "before white balance")
_add("redness", "b_star_mean_uncorrected", "b_star_mean_uncorrected", "central_face", "b*", "diagnostic",
     "before white balance")
_add("redness", "wb_applied", "white_balance_applied", "whole", "flag", "diagnostic")
for _c in ("r", "g", "b"):
    _add("redness", f"wb_gain_{_c}", f"white_balance_gain_{_c}", "whole", "ratio", "diagnostic")

_add("dark_circle", "delta_l_star", "under_eye_darkness", "under_eye", "ΔL*",
     description="cheek reference L* minus under-eye L* (median)")
_add("dark_circle", "delta_l_star_image_left", "under_eye_darkness", "under_eye_image_left", "ΔL*")
_add("dark_circle", "delta_l_star_image_right", "under_eye_darkness", "under_eye_image_right", "ΔL*")
_add("dark_circle", "delta_a_star", "under_eye_redness", "under_eye", "Δa*", description="under-eye minus cheek")
_add("dark_circle", "delta_b_star", "under_eye_yellowness", "under_eye", "Δb*", description="under-eye minus cheek")
_add("dark_circle", "pigmented_type", "pigmented_type", "under_eye", "flag", "flag", "delta b* > 1")
_add("dark_circle", "vascular_type", "vascular_type", "under_eye", "flag", "flag", "delta a* > 1")

_add("oiliness", "highlight_fraction_t_zone_pct", "highlight_fraction", "t_zone", "%")
_add("oiliness", "highlight_fraction_u_zone_pct", "highlight_fraction", "u_zone", "%")
_add("oiliness", "highlight_index_pct", "highlight_index", "whole", "%", "index", "0.6 T-zone + 0.4 U-zone")

_add("radiance", "l_star_mean", "l_star_mean", "whole", "L*")
_add("radiance", "l_star_detrended_std", "lightness_unevenness", "whole", "ΔL*",
     description="std of L* minus its 5 mm shading")
_add("radiance", "colour_nonuniformity_ab", "colour_unevenness", "whole", "Δa*b*")
_add("radiance", "b_star_mean", "b_star_mean", "whole", "b*")
_add("radiance", "ita_deg", "individual_typology_angle", "whole", "°")

# --- eyes and folds --------------------------------------------------------------------------
_add("eye_bag", "shadow_dip_l_star", "shadow_dip", "under_eye", "ΔL*")
_add("eye_bag", "trough_depth_l_star", "trough_depth", "under_eye", "ΔL*")
_add("eye_bag", "eye_bag_index", "eye_bag_index", "under_eye", "ΔL*", "index", "dip + 0.25 x depth")
_add("tear_trough", "groove_depth_l_star", "groove_depth", "tear_trough", "ΔL*")
_add("tear_trough", "groove_length_mm", "groove_length", "tear_trough", "mm")

for _concern in ("droopy_upper_eyelid", "droopy_lower_eyelid"):
    _add(_concern, "eye_closure_max", "eye_closure", "eyes", "0-1", "diagnostic",
         "Face Landmarker blink blendshape, larger eye")
    _add(_concern, "eyes_closed", "eyes_closed", "eyes", "flag", "flag")
_sides("droopy_upper_eyelid", "mrd1_mm", "mrd1", "eyes", "mm", description="margin-reflex distance 1")
_sides("droopy_upper_eyelid", "brow_to_lid_mm", "brow_to_lid", "eyes", "mm")
_sides("droopy_upper_eyelid", "palpebral_fissure_mm", "palpebral_fissure_height", "eyes", "mm")
_sides("droopy_lower_eyelid", "mrd2_mm", "mrd2", "eyes", "mm", description="margin-reflex distance 2")
_sides("droopy_lower_eyelid", "scleral_show_mm", "scleral_show", "eyes", "mm")
_sides("droopy_lower_eyelid", "canthal_tilt_deg", "canthal_tilt", "eyes", "°")

_add("firmness", "fold_depth_l_star", "fold_depth", "nasolabial_marionette", "ΔL*")
_add("firmness", "jowl_shading_l_star", "jowl_shading", "jowl", "ΔL*")
_add("firmness", "firmness_index", "firmness_index", "whole", "ΔL*", "index", "fold + 0.08 x capped jowl shading")
_add("moisture", "flaking_fraction_pct", "flaking_fraction", "whole", "%")
_add("moisture", "fine_roughness_l_star", "fine_roughness", "whole", "ΔL*")
_add("moisture", "dryness_index", "dryness_index", "whole", "index", "index", "flaking % + 0.8 x fine roughness")

_add("skin_type", "highlight_fraction_t_zone_pct", "highlight_fraction", "t_zone", "%")
_add("skin_type", "highlight_fraction_u_zone_pct", "highlight_fraction", "u_zone", "%")
_add("skin_type", "a_star_t_zone", "a_star_mean", "t_zone", "a*")
_add("skin_type", "a_star_u_zone", "a_star_mean", "u_zone", "a*")
_add("skin_type", "a_star_whole", "a_star_mean", "whole", "a*")
_add("skin_type", "moisture_raw", "moisture_raw_score", "whole", "score 1-100", "index")


def describe(concern: str, key: str) -> Quantity | None:
    """The declaration of ``key`` of ``concern``'s measurements; None if undeclared (an alias
    is described as the name it repeats)."""
    table = QUANTITIES.get(concern, {})
    return table.get(ALIASES.get(concern, {}).get(key, key))


def records(concern: str, measurements: dict[str, float]) -> list[tuple[Quantity | None, str, float]]:
    """``(declaration or None, key, value)`` for every name of ``measurements``, aliases left
    out, in the engine's order."""
    aliases = ALIASES.get(concern, {})
    return [(describe(concern, k), k, float(v)) for k, v in measurements.items() if k not in aliases]
