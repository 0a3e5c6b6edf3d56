"""Tags for the ledger: CSV sheets and file-name patterns, and applying them to ledger rows."""

import pandas as pd
import pytest

from skinlab.ledger import Ledger
from skinlab.tags import FilenamePattern, TagError, TagSheet, split_tags, tags_for


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_sheet_from_csv(tmp_path):
    sheet = TagSheet.from_csv(write(tmp_path / "tags.csv", "File,Subject,timepoint,condition,site\n"
                                    "S01_T0.jpg,S01,T0,placebo,A\nS01_T1.JPG,S01,T1,active,A\n"
                                    "visit2/S02.jpg,S02,T0,placebo,B\n"))
    assert len(sheet) == 3 and sheet.key == "File"
    assert sheet("photos/S01_T0.jpg") == {"subject": "S01", "timepoint": "T0", "condition": "placebo", "site": "A"}
    assert sheet("S01_T1.jpg")["timepoint"] == "T1"  # case differs, still one unique match
    assert sheet("/data/visit2/S02.jpg")["subject"] == "S02"  # a path value matches the path's tail
    assert sheet.row_of("S01_T1.JPG") == 3
    with pytest.raises(TagError, match=r"has no row for 'S99.jpg'"):
        sheet("photos/S99.jpg")
    with pytest.raises(TagError, match=r"no row for 2 file\(s\): S98.jpg, S99.jpg"):
        sheet.check(["S01_T0.jpg", "S98.jpg", "S99.jpg"])
    with pytest.raises(TagError, match=r"rows with no matching file: row 3 \('S01_T1.JPG'\), row 4"):
        sheet.check(["S01_T0.jpg"], unused=True)


def test_sheet_errors_name_the_rows(tmp_path):
    with pytest.raises(TagError, match=r"rows 2 and 4 both name 'a.jpg'"):
        TagSheet.from_csv(write(tmp_path / "dup.csv", "filename,subject\na.jpg,S1\nb.jpg,S2\na.jpg,S3\n"))
    with pytest.raises(TagError, match=r"row 3 has no 'filename'"):
        TagSheet.from_csv(write(tmp_path / "blank.csv", "filename,subject\na.jpg,S1\n,S2\n"))
    with pytest.raises(TagError, match="no file-name column"):
        TagSheet.from_csv(write(tmp_path / "nokey.csv", "name,subject\na.jpg,S1\n"))
    with pytest.raises(TagError, match="column 'bad col'"):
        TagSheet.from_csv(write(tmp_path / "badcol.csv", "filename,bad col\na.jpg,S1\n"))
    sheet = TagSheet.from_csv(write(tmp_path / "semi.csv", "image;subject\na.jpg;S1\n"))  # delimiter sniffed
    assert sheet("a.jpg") == {"subject": "S1"}


def test_sheet_from_dataframe():
    df = pd.DataFrame({"filename": ["a.jpg", "b.jpg"], "subject": ["S1", "S2"], "dose": [1.5, float("nan")]})
    sheet = TagSheet.from_dataframe(df)
    assert sheet("b.jpg") == {"subject": "S2", "dose": None}
    fixed, free = split_tags(sheet("a.jpg"))
    assert fixed == {"subject": "S1", "timepoint": None, "condition": None} and free == {"dose": "1.5"}


def test_filename_pattern():
    pat = FilenamePattern("{subject}_{timepoint}.jpg")
    assert pat("photos/S01_T0.jpg") == {"subject": "S01", "timepoint": "T0"}
    assert pat("S01_T0.JPG") == {"subject": "S01", "timepoint": "T0"}  # extension case-insensitive
    assert pat("S01_T0_b.jpg") == {"subject": "S01", "timepoint": "T0_b"}
    with pytest.raises(TagError, match=r"'S01.png' does not fit the file-name pattern"):
        pat("S01.png")
    digits = FilenamePattern(r"{site}/{subject:P\d{3}}-*-{timepoint}.png")
    assert digits("/x/clinicA/P007-anything-w4.png") == {"site": "clinicA", "subject": "P007", "timepoint": "w4"}
    assert digits.match("/x/clinicA/Q007-a-w4.png") is None
    with pytest.raises(TagError, match=r"2 file\(s\) do not fit"):
        pat.check(["S1_T0.jpg", "bad.jpg", "worse.png"])
    with pytest.raises(TagError, match="has no {field}"):
        FilenamePattern("photo.jpg")
    with pytest.raises(TagError, match="twice"):
        FilenamePattern("{a}_{a}.jpg")
    assert tags_for({"subject": "S1"}, "x.jpg") == {"subject": "S1"}
    assert tags_for(lambda src: {"subject": str(src)[-5]}, "abc_1.jpg") == {"subject": "1"}
    with pytest.raises(TagError):
        tags_for(42, "x.jpg")


def test_apply_tags_to_recorded_rows(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite")
    result = {"backend": "local", "engine": "e", "scores": [{"action": "pore", "region": "whole", "raw_score": 1.0}]}
    ids = led.record_many([dict(result=result, image_name=n) for n in ("S01_T0.jpg", "S02_T1.jpg", "odd.jpg")])
    with pytest.raises(TagError, match="odd.jpg"):
        led.apply_tags(FilenamePattern("{subject}_{timepoint}.jpg"))
    assert led.apply_tags(FilenamePattern("{subject}_{timepoint}.jpg"), missing="skip") == 2
    subs = led.submissions().set_index("submission_id")
    assert subs.loc[ids[1], "subject"] == "S02" and subs.loc[ids[1], "timepoint"] == "T1"
    assert pd.isna(subs.loc[ids[2], "subject"])
    sheet = TagSheet([{"filename": "S01_T0.jpg", "subject": "X", "arm": "B"}], origin="inline")
    assert led.apply_tags(sheet, missing="skip") == 1  # fills the free tag, keeps the recorded subject
    assert led.get(ids[0]).tags == {"subject": "S01", "timepoint": "T0", "arm": "B"}
    assert led.apply_tags(sheet, missing="skip", overwrite=True) == 1
    assert led.get(ids[0]).tags["subject"] == "X"
    assert list(led.scores(tags={"arm": "B"}).submission_id) == [ids[0]]
    led.close()


def test_submit_with_a_pattern_and_conflicting_tags_on_reuse(tmp_path, local_server):
    import skinlab
    from skinlab.client import Client, PollSchedule
    from skinlab.ledger import LedgerReuseWarning

    photo = tmp_path / "S07_T3.jpg"
    skinlab.sample_portrait("astronaut", "sd").save(photo, quality=92)
    client = Client(api_key="k-tags", base_url=local_server.url, rate_limiter=False,
                    poll_schedule=PollSchedule(first=0.05, cap=0.2))
    led = Ledger(tmp_path / "study" / "ledger.sqlite")
    sub = led.submit(client, photo, ["acne"], tags=FilenamePattern("{subject}_{timepoint}.jpg"))
    assert sub.status == "success" and sub.tags == {"subject": "S07", "timepoint": "T3"}
    with pytest.warns(UserWarning, match="tags differ"):
        with pytest.warns(LedgerReuseWarning):
            again = led.submit(client, photo, ["acne"], tags={"subject": "S08", "condition": "active"})
    assert again.reused and again.tags == {"subject": "S07", "timepoint": "T3", "condition": "active"}
    with pytest.raises(TagError):
        led.submit(client, photo, ["acne"], tags=FilenamePattern("{subject}-{timepoint}.jpg"))
    assert len(led) == 1  # a tag error stops before anything is recorded or sent
    led.close()
