import warnings

import pytest

from skinlab import actions
from skinlab.actions import (CATALOGUE, estimate_units, resolve_actions, validate_actions, validate_format,
                             validate_miniserver_args)
from skinlab.errors import InvalidParametersError


def test_catalogue_has_16_concerns_per_tier():
    assert len(CATALOGUE) == 32
    assert len(actions.HD_ACTIONS) == 16 and len(actions.SD_ACTIONS) == 16
    assert {a.concern for a in CATALOGUE.values() if a.tier == "hd"} == set(actions.CONCERNS)
    assert all(n.startswith("hd_") for n in actions.HD_ACTIONS)
    assert not any(n.startswith("hd_") for n in actions.SD_ACTIONS)


def test_dark_circle_is_the_asymmetric_pair():
    assert "hd_dark_circle" in CATALOGUE and "dark_circle_v2" in CATALOGUE
    assert "dark_circle" not in CATALOGUE and "hd_dark_circle_v2" not in CATALOGUE
    assert CATALOGUE["dark_circle_v2"].concern == CATALOGUE["hd_dark_circle"].concern == "dark_circle"


@pytest.mark.parametrize("name, masks", [
    ("hd_wrinkle", ["hd_wrinkle_output_all.png", "hd_wrinkle_output_forehead.png",
                    "hd_wrinkle_output_glabellar.png", "hd_wrinkle_output_crowfeet.png",
                    "hd_wrinkle_output_periocular.png", "hd_wrinkle_output_nasolabial.png",
                    "hd_wrinkle_output_marionette.png"]),
    ("hd_pore", ["hd_pore_output_all.png", "hd_pore_output_forehead.png", "hd_pore_output_nose.png",
                 "hd_pore_output_cheek.png"]),
    ("hd_texture", ["hd_texture_output.png"]),
    ("hd_tear_trough", ["hd_tear_trough_output.png"]),
    ("hd_skin_type", ["hd_skin_type_output.png", "hd_skin_type_t_zone_output.png", "hd_skin_type_u_zone_output.png"]),
    ("dark_circle_v2", ["dark_circle_v2_output.png"]),
    ("wrinkle", ["wrinkle_output.png"]),
    ("skin_type", ["skin_type_output.png", "skin_type_t_zone_output.png", "skin_type_u_zone_output.png"]),
])
def test_mask_file_names_follow_contract(name, masks):
    assert list(CATALOGUE[name].mask_files) == masks


def test_full_archives_have_27_and_18_masks():
    assert sum(len(CATALOGUE[n].mask_files) for n in actions.HD_ACTIONS) == 27
    assert sum(len(CATALOGUE[n].mask_files) for n in actions.SD_ACTIONS) == 18


def test_overlay_mask_names_end_in_jpg():
    assert CATALOGUE["hd_pore"].mask_file("nose", overlay=True) == "hd_pore_output_nose.jpg"
    with pytest.raises(InvalidParametersError, match="no region"):
        CATALOGUE["redness"].mask_file("nose")


@pytest.mark.parametrize("n, sd, hd", [(1, 9, 12), (4, 9, 12), (5, 12, 16), (8, 12, 16), (9, 14, 20),
                                       (12, 14, 20), (13, 16, 22), (16, 16, 22)])
def test_unit_tiers(n, sd, hd):
    assert estimate_units(list(actions.SD_ACTIONS[:n])) == sd
    assert estimate_units(list(actions.HD_ACTIONS[:n])) == hd


def test_estimate_counts_duplicates_once():
    assert estimate_units(["wrinkle"] * 5 + ["pore"]) == 9


def test_unknown_name_suggests_closest():
    with pytest.raises(InvalidParametersError, match="Did you mean 'wrinkle'"):
        validate_actions(["wrinkel"])
    with pytest.raises(InvalidParametersError, match="Did you mean 'hd_dark_circle'"):
        validate_actions(["hd_dark_circle_v2"])


def test_empty_mixed_and_non_string():
    with pytest.raises(InvalidParametersError, match="No actions"):
        validate_actions([])
    with pytest.raises(InvalidParametersError, match="Cannot mix HD and SD"):
        validate_actions(["hd_wrinkle", "pore"])
    with pytest.raises(InvalidParametersError, match="must be strings"):
        validate_actions(["pore", 3])


def test_duplicates_dropped_with_warning():
    with pytest.warns(UserWarning, match="Duplicate actions dropped: pore"):
        v = validate_actions(["pore", "wrinkle", "pore"])
    assert v.names == ("pore", "wrinkle") and v.tier == "sd"


def test_no_warning_without_duplicates():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_actions("hd_pore, hd_acne").names == ("hd_pore", "hd_acne")


def test_resolve_concern_shorthand():
    assert resolve_actions("wrinkle,dark_circle") == ["wrinkle", "dark_circle_v2"]
    assert resolve_actions(["wrinkle", "dark_circle"], hd=True) == ["hd_wrinkle", "hd_dark_circle"]
    assert resolve_actions("all", hd=True) == list(actions.HD_ACTIONS)
    assert resolve_actions("dark_circle_v2", hd=True) == ["hd_dark_circle"]


def test_format():
    assert validate_format("json") == "json"
    with pytest.raises(InvalidParametersError, match="Did you mean 'zip'"):
        validate_format("zipp")


def test_miniserver_args_valid_and_normalised():
    out = validate_miniserver_args({"enable_mask_overlay": True, "color_dark_background_hd_pore": "#2b2b2b",
                                    "opacity_dark_background_hd_pore": 0.35,
                                    "enable_dark_background_hd_firmness": False})
    assert out["color_dark_background_hd_pore"] == "2B2B2B"
    assert out["opacity_dark_background_hd_pore"] == 0.35
    assert validate_miniserver_args(None) == {}


@pytest.mark.parametrize("args, match", [
    ({"enable_mask_overlai": True}, "Did you mean 'enable_mask_overlay'"),
    ({"color_dark_background_hd_pores": "FFFFFF"}, "Did you mean 'color_dark_background_hd_pore'"),
    ({"color_dark_background_hd_pore": "GGGGGG"}, "6 hex digits"),
    ({"color_dark_background_hd_pore": "FFF"}, "6 hex digits"),
    ({"opacity_dark_background_hd_pore": 1.5}, "from 0 to 1"),
    ({"opacity_dark_background_hd_pore": -0.1}, "from 0 to 1"),
    ({"opacity_dark_background_hd_pore": True}, "from 0 to 1"),
    ({"opacity_dark_background_hd_pore": float("nan")}, "from 0 to 1"),
    ({"enable_mask_overlay": "yes"}, "True or False"),
])
def test_miniserver_args_errors(args, match):
    with pytest.raises(InvalidParametersError, match=match):
        validate_miniserver_args(args)


def test_miniserver_args_must_be_mapping():
    with pytest.raises(InvalidParametersError, match="must be a dict"):
        validate_miniserver_args(["enable_mask_overlay"])


@pytest.mark.parametrize("actions, suggestion", [
    (["redness", "dark_circle"], "dark_circle_v2"),        # SD list: the SD name of the concern
    (["hd_redness", "dark_circle"], "hd_dark_circle"),     # HD list: the HD name
    (["redness", "hd_dark_circle_v2"], "dark_circle_v2"),
    (["hd_wrinkle", "hd_pores"], "hd_pore"),
    (["wrinkel", "pore"], "wrinkle"),
    (["hd_dark_circle_v2"], "hd_dark_circle"),             # alone: the closest of all 32
])
def test_unknown_name_suggestion_follows_the_tier_of_the_others(actions, suggestion):
    with pytest.raises(InvalidParametersError) as info:
        validate_actions(actions)
    assert f"Did you mean {suggestion!r}?" in str(info.value)
    # and the suggestion, put in place, validates
    fixed = [suggestion if a not in CATALOGUE else a for a in actions]
    assert validate_actions(fixed).names == tuple(fixed)


@pytest.mark.parametrize("spec, hd, names", [
    ("Wrinkle", False, ["wrinkle"]),
    (" Wrinkle , PORE ", False, ["wrinkle", "pore"]),
    ("Dark_Circle", False, ["dark_circle_v2"]),
    ("Dark_Circle", True, ["hd_dark_circle"]),
    (["HD_Wrinkle ", "\tRedness"], True, ["hd_wrinkle", "hd_redness"]),
    ("ALL", False, list(actions.SD_ACTIONS)),
    (" All ", True, list(actions.HD_ACTIONS)),
])
def test_names_and_concern_keys_case_and_space_insensitive(spec, hd, names):
    assert resolve_actions(spec, hd=hd) == names
    assert validate_actions(resolve_actions(spec, hd=hd)).names == tuple(names)


def test_validate_actions_normalises_case_and_space():
    assert validate_actions(["Wrinkle", "PORE ", " Redness\n"]).names == ("wrinkle", "pore", "redness")
    assert validate_actions("HD_Pore, hd_ACNE").names == ("hd_pore", "hd_acne")
    assert validate_actions([" Dark_Circle_V2 "]).names == ("dark_circle_v2",)
    with pytest.warns(UserWarning, match="Duplicate actions dropped: wrinkle$"):
        assert validate_actions(["wrinkle", "Wrinkle "]).names == ("wrinkle",)


def test_unknown_name_quoted_as_typed():
    with pytest.raises(InvalidParametersError, match=r"Unknown action 'Wrinkel'\. Did you mean 'wrinkle'\?"):
        validate_actions(resolve_actions(" Wrinkel"))
    with pytest.raises(InvalidParametersError, match="must be strings"):
        validate_actions(resolve_actions(["Pore", 3]))


@pytest.mark.parametrize("spec", [None, 3, object()])
def test_resolve_refuses_a_spec_that_is_no_list_of_names(spec):
    """skinlab.analyze(img, None) used to fail with a bare "'NoneType' object is not iterable"."""
    with pytest.raises(InvalidParametersError, match=r"actions must be 'all', a comma-separated string or a list"):
        resolve_actions(spec)
