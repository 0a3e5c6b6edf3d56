"""The whole form in one call: :func:`skinlab.app`."""

from __future__ import annotations

import html

import ipywidgets as widgets

from . import logic
from ._base import Feedback, guard, section
from .action_picker import ActionPicker
from .image_picker import ImagePicker
from .submissions import ResultViewer, SubmissionsTable
from .submit_panel import SubmitPanel

__all__ = ["App", "app"]


class App(widgets.VBox):
    """The action picker, image picker, submit panel, submissions table and result viewer, wired
    together. Build it with :func:`skinlab.app`; the parts are attributes (``actions``,
    ``images``, ``submit``, ``table``, ``viewer``) and all messages go to ``feedback``.

    The thumbnails and the viewer's images are widget state (saved into the notebook only with
    "Save Widget State Automatically" on); :meth:`clear_images` empties them, and :meth:`close`
    empties them and closes every widget of the form."""

    def __init__(self, ledger=None, *, client=None, tier: str = "sd", concerns=(), start_dir: str | None = None,
                 upload_limit_mb: float = logic.UPLOAD_LIMIT_MB, max_workers: int = 2, **options) -> None:
        from ..client import connect

        self.feedback = Feedback(keep=15)
        self.ledger = logic.open_ledger(ledger)
        self.client = client if client is not None else connect()
        self.actions = ActionPicker(tier, concerns, feedback=self.feedback)
        self.images = ImagePicker(tier, start_dir=start_dir, upload_limit_mb=upload_limit_mb,
                                  feedback=self.feedback)
        self.submit = SubmitPanel(self.ledger, actions=self.actions, images=self.images, client=self.client,
                                  max_workers=max_workers, feedback=self.feedback, **options)
        self.table = SubmissionsTable(self.ledger, feedback=self.feedback)
        self.viewer = ResultViewer(self.ledger, feedback=self.feedback)
        self.actions.on_change(self._tier_follow)
        self.table.on_select(self.viewer.show)
        self.submit.on_item(self._item_changed)
        self.submit.on_finished(self._finished)
        title = widgets.HTML(
            "<h2 style='margin:4px 0'>skinlab: skin analysis</h2>"
            f"<div style='font-size:12px;line-height:1.4;color:#555'>Ledger: {html.escape(str(self.ledger.path))} (every "
            "submission is recorded there, with its results)</div>")
        self.feedback.output.layout = widgets.Layout(border="1px solid #ddd", padding="2px 6px")
        super().__init__([
            title,
            section("1. Concerns", "Tick the concerns to analyse. One task is all SD or all HD: the switch "
                                   "sets the tier for every concern."),
            self.actions,
            section("2. Photos", "Face photos, JPEG or PNG, the face filling most of the frame."),
            self.images,
            section("3. Submit"),
            self.submit,
            section("Messages"),
            self.feedback.output,
            section("Submissions", "The ledger, newest first. Choose one under <i>Show</i> to see its scores."),
            self.table,
            section("Result"),
            self.viewer,
        ])
        self.add_class("skinlab-app")
        self.feedback.info("Messages about your photos and submissions appear here.")
        self.viewer.show(self.table.selected)

    def image_widgets(self) -> list[widgets.Image]:
        """Every image widget of the form: the thumbnails and the viewer's images."""
        return self.images.image_widgets() + self.viewer.image_widgets()

    def clear_images(self) -> None:
        """Empty the thumbnails and the result viewer's images (lists, tables and scores stay)."""
        self.images.clear_images()
        self.viewer.clear_images()

    def close(self) -> None:
        """Empty the images, then close the form and every widget in it."""
        self.clear_images()
        seen, stack, tree = set(), list(self.children), []
        while stack:
            w = stack.pop()
            if id(w) in seen:
                continue
            seen.add(id(w))
            tree.append(w)
            stack.extend(c for c in getattr(w, "children", ()) if isinstance(c, widgets.Widget))
        for w in tree:
            w.close()
        super().close()

    @guard
    def _tier_follow(self, picker) -> None:
        self.images.set_tier(picker.tier)

    @guard
    def _item_changed(self, item) -> None:
        if item.outcome in ("done", "reused", "failed", "skipped"):
            self.table.refresh()

    @guard
    def _finished(self, report) -> None:
        newest = report.ids[-1] if report is not None and report.ids else None
        self.table.refresh(select=newest)


def app(ledger=None, *, client=None, tier: str = "sd", concerns=(), start_dir: str | None = None,
        upload_limit_mb: float = logic.UPLOAD_LIMIT_MB, max_workers: int = 2, **options) -> App:
    """The whole skin-analysis form: choose concerns and photos, submit, see the table and results.

    >>> import skinlab
    >>> skinlab.app(ledger="study/ledger.sqlite")          # doctest: +SKIP

    Parameters
    ----------
    ledger : skinlab.Ledger or path, optional
        Where submissions are recorded (default ``skinlab-study/ledger.sqlite``).
    client : skinlab.Client, optional
        Default: the cloud when an API key is set, else the embedded local backend.
    tier : {"sd", "hd"}
    concerns : iterable of str
        Concerns ticked at the start.
    start_dir : str, optional
        Where the path chooser starts (default: the working directory).
    upload_limit_mb : float
        The notebook server's upload limit the form states: 10 MiB, the default of Jupyter Server
        and Voilà (Tornado's ``websocket_max_message_size``). Pass the new value when the server
        was started with a larger one (``--ServerApp.tornado_settings``).
    max_workers : int
        Photos analysed at once.
    **options
        Passed to :func:`skinlab.batch.analyze_many` (``format``, ``mask_overlay``, ...).
    """
    return App(ledger, client=client, tier=tier, concerns=concerns, start_dir=start_dir,
               upload_limit_mb=upload_limit_mb, max_workers=max_workers, **options)
