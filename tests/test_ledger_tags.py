"""Tags for the ledger: CSV sheets and file-name patterns, and applying them to ledger rows."""

import re
import time

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


def test_sheet_that_cannot_be_read_is_a_tag_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TagError, match=r"No tag sheet at 'nofile.csv': there is no such file \(relative paths "
                                       r"start at '.*'\)"):
        TagSheet.from_csv("nofile.csv")
    with pytest.raises(TagError, match="is a folder, not a tag sheet"):
        TagSheet.from_csv(tmp_path)
    binary = tmp_path / "photo.csv"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01" + bytes(range(256)))
    with pytest.raises(TagError, match=r"'photo.csv' is a binary file, not a CSV text file\. Save it"):
        TagSheet.from_csv("photo.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("filename,subject\nS01_T0.jpg,Zoë\n".encode("cp1252"))
    with pytest.raises(TagError, match=r"'latin.csv' is not UTF-8 text \(byte 0xeb on line 2 is not valid\)"):
        TagSheet.from_csv("latin.csv")
    assert TagSheet.from_csv("latin.csv", encoding="cp1252")("S01_T0.jpg") == {"subject": "Zoë"}
    workbook = tmp_path / "tags.csv"
    workbook.write_bytes(b"PK\x03\x04" + b"\x14\x00" * 40)
    with pytest.raises(TagError, match="spreadsheet workbook .* not a CSV file"):
        TagSheet.from_csv(workbook)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(TagError, match="is empty: a tag sheet needs a header row"):
        TagSheet.from_csv("empty.csv")
    utf16 = tmp_path / "unicode.txt"  # Excel's "Unicode text": UTF-16 with a byte-order mark, tab-separated
    utf16.write_bytes("filename\tsubject\nS01_T0.jpg\tS01\n".encode("utf-16"))
    assert TagSheet.from_csv(utf16)("S01_T0.jpg") == {"subject": "S01"}


def test_pattern_without_extension_matches_the_stem():
    pat = FilenamePattern("{subject}_{timepoint}")
    assert pat("photos/S01_T0.jpg") == {"subject": "S01", "timepoint": "T0"}
    assert pat("S01_T0.PNG") == {"subject": "S01", "timepoint": "T0"}
    assert pat("S01_T0") == {"subject": "S01", "timepoint": "T0"}  # no extension at all
    assert FilenamePattern("{site}/{subject}")("/data/clinicA/S01.jpg") == {"site": "clinicA", "subject": "S01"}
    assert FilenamePattern("{subject}.*")("S01.jpg") == {"subject": "S01"}  # one that covers the extension itself
    assert FilenamePattern("{subject}_{timepoint}.jpg")("S01_T0.jpg")["timepoint"] == "T0"


@pytest.mark.parametrize("pattern, first, second, fixed", [
    ("{subject}{timepoint}.jpg", "subject", "timepoint", "{subject}_{timepoint}.jpg"),
    ("{site}/{subject}{visit}", "subject", "visit", "{site}/{subject}_{visit}"),
    ("{subject}*{timepoint}.jpg", "subject", "timepoint", "{subject}_{timepoint}.jpg"),
])
def test_adjacent_fields_refused(pattern, first, second, fixed):
    with pytest.raises(TagError) as info:
        FilenamePattern(pattern)
    text = str(info.value)
    assert f"puts {{{first}}} and {{{second}}} side by side with no separator" in text
    assert f"e.g. {fixed!r}" in text and "its own regular expression" in text
    FilenamePattern(fixed)


def test_adjacent_fields_with_their_own_expression_allowed():
    assert FilenamePattern(r"{subject:S\d+}{timepoint}.jpg")("S01T0.jpg") == {"subject": "S01", "timepoint": "T0"}
    assert FilenamePattern(r"{subject}{timepoint:T\d}.jpg")("S01T0.jpg") == {"subject": "S01", "timepoint": "T0"}


@pytest.mark.parametrize("pattern, names, why", [
    ("{subject}-{timepoint}.jpg", ["S01_T0.jpg", "S01_T1.jpg", "S02-T0.jpg"],
     "the pattern needs '-' after {subject}, and 'S01_T0.jpg' has none there"),
    ("{subject}_{timepoint}.png", ["S01_T0.jpg"],
     "the pattern needs the name to end in '.png' (any case), and 'S01_T0.jpg' does not"),
    (r"{subject:P\d+}_{timepoint}.jpg", ["S01_T0.jpg"],
     r"the pattern needs text matching {subject:P\d+} at the start, and 'S01_T0.jpg' has none"),
    ("visit_{subject}.jpg", ["S01.jpg"], "the pattern needs 'visit_' at the start, and 'S01.jpg' has none there"),
    (r"{subject}_{timepoint:T\d}.jpg", ["S01_T0x.jpg"],
     r"the pattern needs '.jpg' right after {timepoint:T\d}, and 'S01_T0x.jpg' has none there"),
])
def test_mismatch_names_one_file_and_what_the_pattern_needs(pattern, names, why):
    pat = FilenamePattern(pattern)
    bad = [n for n in names if pat.match(n) is None]
    with pytest.raises(TagError) as info:
        pat.check(names)
    text = str(info.value)
    assert text.startswith(f"{len(bad)} file(s) do not fit {pattern!r}: {', '.join(bad)}. ")
    assert f"For example, {why}. Rename the files or change the pattern." in text
    assert pat.why_not(names[0]) == why
    with pytest.raises(TagError, match=re.escape(why)):
        pat(names[0])
    assert pat.why_not("S01-T0.jpg" if "-" in pattern else "x") != why


@pytest.mark.parametrize("column, fixed", [("subj", "subject"), ("Subject_ID", "subject"), ("timepiont", "timepoint"),
                                           ("cond", "condition")])
def test_a_column_spelled_like_a_fixed_tag_is_warned_about(tmp_path, column, fixed):
    """A sheet column 'subj' becomes a free tag and leaves the subject column empty: the sheet says
    so when it is read, naming the fixed tag meant. Other study facts (visit, site) pass quietly."""
    import warnings

    sheet = tmp_path / "tags.csv"
    sheet.write_text(f"filename,{column},site\nS01_T0.jpg,S01,A\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=rf"{column!r} is kept as a free tag, not as {fixed}.*Rename it to '{fixed}'"):
        TagSheet.from_csv(sheet)
    with pytest.warns(UserWarning, match=r"field: 'subj' is kept as a free tag, not as subject"):
        FilenamePattern("{subj}_{timepoint}.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FilenamePattern("{subject}_{visit}.jpg")
        FilenamePattern("{object}_{edition}_{subject_age}.jpg")  # other words, not misspellings
        sheet.write_text(f"filename,subject,{column}\nS01_T0.jpg,S01,x\n" if fixed == "subject"
                         else "filename,visit,site\nS01_T0.jpg,1,A\n", encoding="utf-8")
        TagSheet.from_csv(sheet)  # the fixed tag is there too, or no column looks like one


def test_a_copy_submitted_while_its_twin_is_in_flight_warns_about_its_tags(tmp_path):
    """Two copies of one photo in a batch (S01_T0.jpg copied to S01_T1.jpg by mistake) make one
    task; the second waits for the first's task. Its different tags used to vanish without a word
    whenever the twin was still in flight (any run with several workers); now they are warned about
    as on a plain reuse, and tags the row lacks are filled."""
    import shutil
    import threading
    import warnings

    import skinlab
    from skinlab.client import Client, PollSchedule
    from skinlab.ledger import LedgerReuseWarning
    from skinlab.local import LocalServer

    first = tmp_path / "S01_T0.jpg"
    skinlab.sample_portrait("astronaut", "sd").save(first, quality=92)
    copy = tmp_path / "S01_T1.jpg"
    shutil.copy(first, copy)
    with LocalServer(task_duration_s=1.0, rate_limit=None) as server:
        client = Client(api_key="k-twin", base_url=server.url, rate_limiter=False,
                        poll_schedule=PollSchedule(first=0.05, cap=0.2))
        led = Ledger(tmp_path / "study" / "ledger.sqlite")
        worker = threading.Thread(target=led.submit, args=(client, first, ["acne"]),
                                  kwargs={"tags": {"subject": "S01", "timepoint": "T0"}})
        worker.start()
        end = time.monotonic() + 30
        while time.monotonic() < end and list(led.submissions().status) != ["running"]:
            time.sleep(0.02)
        assert list(led.submissions().status) == ["running"]  # the twin is in flight
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LedgerReuseWarning)
            with pytest.warns(UserWarning, match=r"tags differ \(timepoint: 'T0' recorded, 'T1' given\)"):
                twin = led.submit(client, copy, ["acne"], tags={"subject": "S01", "timepoint": "T1", "site": "B"})
        worker.join(30)
        assert twin.reused and twin.tags == {"subject": "S01", "timepoint": "T0", "site": "B"}
        assert len(led) == 1 and len(server.app.task_ids()) == 1
        led.close()


def test_a_photo_file_replaced_since_its_analysis_is_warned_about(tmp_path, local_server):
    """Overwriting S01_T0.jpg (a better crop, say) and submitting it again makes a second
    submission with the same tags; tables and plots of those tags would then average the two.
    The second submit says so, naming the first; an unchanged file is reused without it."""
    import warnings

    import skinlab
    from skinlab.client import Client, PollSchedule
    from skinlab.ledger import LedgerReuseWarning

    photo = tmp_path / "S01_T0.jpg"
    skinlab.sample_portrait("astronaut", "sd").save(photo, quality=92)
    client = Client(api_key="k-replaced", base_url=local_server.url, rate_limiter=False,
                    poll_schedule=PollSchedule(first=0.05, cap=0.2))
    led = Ledger(tmp_path / "study" / "ledger.sqlite")
    tags = FilenamePattern("{subject}_{timepoint}.jpg")
    first = led.submit(client, photo, ["acne"], tags=tags)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", LedgerReuseWarning)
        assert led.submit(client, photo, ["acne"], tags=tags).reused  # unchanged: no word about it
    skinlab.sample_portrait("grace_hopper", "sd").save(photo, quality=92)
    with pytest.warns(UserWarning, match=rf"S01_T0.jpg was analysed before with other bytes \(submission "
                                         rf"{first.id}\).*ledger.tag\({first.id}, ...\)"):
        second = led.submit(client, photo, ["acne"], tags=tags)
    assert second.id != first.id and len(led) == 2
    led.close()
