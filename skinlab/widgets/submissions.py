"""The submissions table (the ledger, filterable) and the result viewer (scores and masks)."""

from __future__ import annotations

import threading
from typing import Callable

import ipywidgets as widgets

from . import logic
from ._base import Feedback, guard

__all__ = ["ResultViewer", "SubmissionsTable"]


class SubmissionsTable(widgets.VBox):
    """The ledger's submissions, newest first, filterable by status and tag.

    :meth:`refresh` reloads it (the form calls it as work finishes; the Refresh button picks up
    other notebooks' submissions). Choosing a row in *Show* calls the :meth:`on_select` callbacks
    with its submission id.

    Parameters
    ----------
    ledger : skinlab.Ledger, path or None
    max_rows : int
        Rows shown in the table (the newest).
    """

    def __init__(self, ledger=None, *, max_rows: int = 50, feedback: Feedback | None = None) -> None:
        from ..ledger import STATUSES

        own_feedback = feedback is None
        self.feedback = feedback or Feedback()
        self.ledger = logic.open_ledger(ledger)
        self.max_rows = max_rows
        self.frame = None
        self._listeners: list[Callable[[int | None], None]] = []
        self._lock = threading.RLock()
        self._quiet = False
        self.status = widgets.Dropdown(options=[("any", "")] + [(s, s) for s in STATUSES], value="",
                                       description="Status", layout=widgets.Layout(width="200px"))
        self.status.add_class("skinlab-filter-status")
        self.tag = widgets.Text(description="Tag", placeholder="S01, or subject=S01", continuous_update=False,
                                layout=widgets.Layout(width="260px"))
        self.tag.add_class("skinlab-filter-tag")
        self.refresh_button = widgets.Button(description="Refresh", icon="refresh",
                                             layout=widgets.Layout(width="100px"))
        self.refresh_button.add_class("skinlab-refresh")
        self.count = widgets.HTML()
        self.table = widgets.HTML()
        self.table.add_class("skinlab-submissions")
        self.choose = widgets.Dropdown(options=[], description="Show", layout=widgets.Layout(width="520px"))
        self.choose.add_class("skinlab-choose")
        self.status.observe(self._filter_changed, names="value")
        self.tag.observe(self._filter_changed, names="value")
        self.refresh_button.on_click(self._refresh_clicked)
        self.choose.observe(self._chosen, names="value")
        super().__init__([
            widgets.HBox([self.status, self.tag, self.refresh_button, self.count],
                         layout=widgets.Layout(align_items="center")),
            widgets.Box([self.table], layout=widgets.Layout(max_height="320px", overflow="auto")),
            self.choose,
        ] + ([self.feedback.output] if own_feedback else []))
        self.add_class("skinlab-submissions-table")
        self.refresh()

    def on_select(self, callback: Callable[[int | None], None]) -> None:
        """Call ``callback(submission_id)`` when a submission is chosen in *Show*."""
        self._listeners.append(callback)

    @property
    def selected(self) -> int | None:
        return self.choose.value

    @guard
    def refresh(self, select: int | None = None) -> None:
        """Reload the table; keep the chosen row, or choose ``select`` when given and shown."""
        with self._lock:
            frame = logic.filter_submissions(self.ledger, self.status.value or None, self.tag.value)
            self.frame = frame
            options = logic.submission_options(frame)
            ids = [v for _, v in options]
            keep = select if select in ids else (self.choose.value if self.choose.value in ids else None)
            self._quiet = True
            try:
                self.choose.options = options
                self.choose.value = keep if keep is not None else (ids[0] if ids else None)
            finally:
                self._quiet = False
            self.table.value = logic.submissions_table_html(frame, max_rows=self.max_rows, selected=self.choose.value)
            total = len(self.ledger)
            self.count.value = (f"<span style='color:#555;font-size:12px;margin-left:8px'>{len(frame)} of {total} "
                                f"submission(s)</span>")
            chosen = self.choose.value
        self._notify(chosen)

    def select(self, submission_id: int) -> None:
        """Choose ``submission_id`` (refreshing first if it is not listed yet)."""
        self.refresh(select=submission_id)

    def _notify(self, submission_id: int | None) -> None:
        for callback in list(self._listeners):
            callback(submission_id)

    @guard
    def _filter_changed(self, change) -> None:
        self.refresh()

    @guard
    def _refresh_clicked(self, _button=None) -> None:
        self.refresh()

    @guard
    def _chosen(self, change) -> None:
        if self._quiet:
            return
        with self._lock:
            if self.frame is not None:
                self.table.value = logic.submissions_table_html(self.frame, max_rows=self.max_rows,
                                                                selected=change["new"])
        self._notify(change["new"])


class ResultViewer(widgets.VBox):
    """The scores and masks of one submission.

    The score table is shown at once; the photo appears only when a mask is chosen (or the
    profile plot is asked for), so a screen never fills with faces by accident. An image is kept
    in the widget state only while it is shown: hiding it (another submission, "no mask", the
    plot unticked), :meth:`clear_images` and :meth:`close` empty it.
    """

    def __init__(self, ledger=None, submission_id: int | None = None, *, feedback: Feedback | None = None) -> None:
        own_feedback = feedback is None
        self.feedback = feedback or Feedback()
        self.ledger = logic.open_ledger(ledger)
        self.submission = None
        self.result = None
        self._lock = threading.RLock()
        self._quiet = False
        self.header = widgets.HTML("<em>Choose a submission to see its scores.</em>")
        self.header.add_class("skinlab-viewer-header")
        self.scores = widgets.HTML()
        self.scores.add_class("skinlab-scores")
        self.mask = widgets.Dropdown(options=[("(no result)", None)], description="Mask",
                                     layout=widgets.Layout(width="420px"))
        self.mask.add_class("skinlab-mask-choice")
        self.mask_image = widgets.Image(format="png", layout=widgets.Layout(display="none", max_width="420px",
                                                                            height="auto", object_fit="contain"))
        self.mask_image.add_class("skinlab-mask-image")
        self.profile = widgets.Checkbox(value=False, description="Score profile plot", indent=False)
        self.profile.add_class("skinlab-profile-toggle")
        self.profile_image = widgets.Image(format="png", layout=widgets.Layout(display="none", max_width="560px",
                                                                               height="auto", object_fit="contain"))
        self.profile_image.add_class("skinlab-profile-image")
        self.mask.observe(self._mask_chosen, names="value")
        self.profile.observe(self._profile_toggled, names="value")
        super().__init__([
            self.header, self.scores, widgets.HBox([self.mask, self.profile]),
            widgets.HBox([self.mask_image, self.profile_image], layout=widgets.Layout(align_items="flex-start")),
        ] + ([self.feedback.output] if own_feedback else []))
        self.add_class("skinlab-result-viewer")
        if submission_id is not None:
            self.show(submission_id)

    @guard
    def show(self, submission_id: int | None) -> None:
        """Show the submission ``submission_id`` (None clears the viewer)."""
        with self._lock:
            self._quiet = True
            try:
                self._show(submission_id)
            finally:
                self._quiet = False

    def image_widgets(self) -> list[widgets.Image]:
        """The viewer's image widgets (the mask over the photo, the profile plot)."""
        return [self.mask_image, self.profile_image]

    def _hide_images(self) -> None:
        for image in self.image_widgets():
            image.layout.display = "none"
            image.value = b""  # hidden is not enough: the PNG would stay in the widget state

    @guard
    def clear_images(self) -> None:
        """Hide and empty the mask and profile images (the scores stay)."""
        with self._lock:
            self._quiet = True
            try:
                self._hide_images()
                self.mask.value = None
                self.profile.value = False
            finally:
                self._quiet = False

    def close(self) -> None:
        """Empty the images, then close the viewer."""
        self.clear_images()
        super().close()

    def _show(self, submission_id: int | None) -> None:
        self._hide_images()
        self.profile.value = False
        if submission_id is None:
            self.submission = self.result = None
            self.header.value = "<em>Choose a submission to see its scores.</em>"
            self.scores.value = ""
            self.mask.options = [("(no result)", None)]
            return
        from ..display import result_html

        sub = self.ledger.get(int(submission_id))
        self.submission = sub
        self.header.value = logic.submission_header_html(sub)
        self.result = sub.result
        if self.result is None:
            self.scores.value = ""
            self.mask.options = [("(no result)", None)]
            return
        self.scores.value = result_html(self.result)
        self.mask.options = logic.mask_options(self.result)
        self.mask.value = None

    @guard
    def _mask_chosen(self, change) -> None:
        if self._quiet:
            return
        with self._lock:
            key = change["new"]
            if key is None or self.result is None:
                self.mask_image.layout.display = "none"
                self.mask_image.value = b""
                return
            self.mask_image.value = logic.mask_png(self.result, *key)
            self.mask_image.layout.display = ""

    @guard
    def _profile_toggled(self, change) -> None:
        if self._quiet:
            return
        with self._lock:
            if not change["new"] or self.result is None:
                self.profile_image.layout.display = "none"
                self.profile_image.value = b""
                return
            self.profile_image.value = logic.profile_png(self.result)
            self.profile_image.layout.display = ""
