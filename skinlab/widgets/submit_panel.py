"""The submit panel: tags, backend and cost, the submit button, per-image progress."""

from __future__ import annotations

import html
import logging
import threading
from typing import Any, Callable

import ipywidgets as widgets

from ..errors import InvalidParametersError
from . import logic
from ._base import Feedback, guard

__all__ = ["SubmitPanel"]

_FINAL = ("done", "reused", "failed", "skipped", "interrupted")


class SubmitPanel(widgets.VBox):
    """Tag the photos, see the backend and the cost, submit, and follow each photo.

    The work runs in a worker thread (:class:`~skinlab.widgets.logic.Runner` calling
    :func:`skinlab.batch.analyze_many`), so the notebook stays responsive; the submit button is
    disabled while it runs and a second click during a run starts nothing. Every submission is
    recorded in the ledger, which also stops a photo already analysed with the same actions from
    being billed again. Warnings, and records of the ``skinlab`` loggers at WARNING or above,
    raised during a run are shown in the form's output area too.

    Parameters
    ----------
    ledger : skinlab.Ledger, path or None
        Default ``skinlab-study/ledger.sqlite``.
    actions : ActionPicker, list of str or str
        The actions (a picker's selection, or names/concerns).
    images : ImagePicker or list of sources
    client : skinlab.Client, optional
        Default :func:`skinlab.connect` (the cloud with an API key, else the local backend).
    max_workers : int
        Photos in flight at once.
    **options
        Passed to :func:`~skinlab.batch.analyze_many` (``format``, ``mask_overlay``, ...).
    """

    def __init__(self, ledger=None, *, actions=None, images=None, client=None, max_workers: int = 2,
                 feedback: Feedback | None = None, **options: Any) -> None:
        from ..client import connect

        own_feedback = feedback is None
        self.feedback = feedback or Feedback()
        self.ledger = logic.open_ledger(ledger)
        self.client = client if client is not None else connect()
        self.actions = actions
        self.images = images
        self.max_workers = max_workers
        self.options = options
        self.runner = logic.Runner()
        self.report = None
        self._item_listeners: list[Callable] = []
        self._finish_listeners: list[Callable] = []
        self._lines: dict[int, str] = {}
        self._final: set[int] = set()
        self._lock = threading.Lock()

        wide = widgets.Layout(width="300px")
        self.subject = widgets.Text(description="Subject", placeholder="e.g. S01", layout=wide)
        self.timepoint = widgets.Text(description="Timepoint", placeholder="e.g. T0, week 4", layout=wide)
        self.condition = widgets.Text(description="Condition", placeholder="e.g. placebo", layout=wide)
        self.notes = widgets.Textarea(description="Notes", placeholder="free text, kept as the tag 'notes' "
                                      "(no names or other identifying details)",
                                      layout=widgets.Layout(width="610px", height="48px"))
        for w, name in ((self.subject, "subject"), (self.timepoint, "timepoint"), (self.condition, "condition"),
                        (self.notes, "notes")):
            w.add_class(f"skinlab-tag-{name}")
        self.backend = widgets.HTML()
        self.backend.add_class("skinlab-backend")
        self.cost = widgets.HTML()
        self.cost.add_class("skinlab-cost")
        self.balance_button = widgets.Button(description="Check balance", icon="balance-scale",
                                             tooltip="Ask the service for the unit balance")
        self.balance_button.on_click(self._balance)
        self.submit_button = widgets.Button(description="Submit", button_style="primary", icon="paper-plane",
                                            tooltip="Analyse the photos with the chosen concerns")
        self.submit_button.add_class("skinlab-submit")
        self.submit_button.on_click(self._submit)
        self.stop_button = widgets.Button(description="Stop", icon="stop", disabled=True,
                                          tooltip="Start no new photos; tasks already sent finish and are recorded")
        self.stop_button.add_class("skinlab-stop")
        self.stop_button.on_click(self._stop)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="Progress",
                                            layout=widgets.Layout(width="400px"))
        self.progress.add_class("skinlab-progress")
        self.progress_text = widgets.HTML()
        self.items_html = widgets.HTML()
        self.items_html.add_class("skinlab-items")

        for picker in (actions, images):
            if hasattr(picker, "on_change"):
                picker.on_change(lambda _p: self.update_cost())

        super().__init__([
            widgets.HBox([self.subject, self.timepoint]),
            widgets.HBox([self.condition]),
            self.notes,
            self.backend,
            widgets.HBox([self.cost, self.balance_button], layout=widgets.Layout(align_items="center")),
            widgets.HBox([self.submit_button, self.stop_button, self.progress, self.progress_text],
                         layout=widgets.Layout(align_items="center")),
            self.items_html,
        ] + ([self.feedback.output] if own_feedback else []))
        self.add_class("skinlab-submit-panel")
        self.backend.value = (f"<div style='font-size:12px;line-height:1.4'>{html.escape(logic.backend_summary(self.client))}"
                              "</div>")
        self.update_cost()

    # ---- API

    @property
    def running(self) -> bool:
        return self.runner.running

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the current run (for scripts and tests); True when none is going on."""
        return self.runner.join(timeout)

    def on_item(self, callback: Callable) -> None:
        """Call ``callback(batch_item)`` whenever a photo's state changes (from the worker thread)."""
        self._item_listeners.append(callback)

    def on_finished(self, callback: Callable) -> None:
        """Call ``callback(report_or_None)`` when a run ends (from the worker thread)."""
        self._finish_listeners.append(callback)

    @guard
    def update_cost(self) -> None:
        try:
            names = logic.resolve_action_input(self.actions)
        except InvalidParametersError:
            names = []
        sources, out = logic.resolve_image_input(self.images, names)
        text = logic.cost_summary(names, len(sources), self.client.backend)
        grey = [i.label for i in out if i.greyscale]
        if grey:
            text += (f" Left out while colour concerns are ticked: {', '.join(grey)} (greyscale, so colour cannot "
                     "be measured).")
        self.cost.value = f"<div style='font-size:12px;line-height:1.4'>{html.escape(text)}</div>"

    # ---- handlers

    @guard
    def _balance(self, _button=None) -> None:
        self.feedback.info(f"Unit balance on the {self.client.backend} backend: {self.client.balance():g}")

    @guard
    def _submit(self, _button=None) -> None:
        if self.runner.running:
            self.feedback.warn("A submission is already running: this click started nothing. Wait for it, or "
                               "press Stop.")
            return
        names = logic.resolve_action_input(self.actions)
        if not names:
            raise InvalidParametersError("Choose at least one concern first.")
        sources, rejected = logic.resolve_image_input(self.images, names)
        if rejected:
            self.feedback.warn("Left out, they would be refused: "
                               + "; ".join(f"{i.label}: {i.message}" for i in rejected))
        if not sources:
            raise InvalidParametersError("Choose at least one photo that passes pre-flight first.")
        tags = logic.tags_from_fields(self.subject.value, self.timepoint.value, self.condition.value,
                                      self.notes.value)
        with self._lock:
            self._lines, self._final = {}, set()
        self.progress.max, self.progress.value = len(sources), 0
        self.progress.bar_style = "info"
        self.progress_text.value = f"0 of {len(sources)}"
        self.items_html.value = ""
        self.submit_button.disabled = True
        self.stop_button.disabled = False
        try:
            started = self.runner.start(
                sources, names, ledger=self.ledger, client=self.client, tags=tags or None,
                max_workers=self.max_workers, on_update=self._item_update, on_done=self._done,
                on_error=self._failed, on_warning=self.feedback.warn, on_log=self._logged, on_finally=self._finally,
                **self.options)
        except BaseException:
            self.submit_button.disabled = False
            self.stop_button.disabled = True
            raise
        if not started:  # pragma: no cover - the check above already refused; kept for safety
            self.feedback.warn("A submission is already running: this click started nothing.")
            return
        self.feedback.info(f"Submitting {len(sources)} photo(s) with {len(names)} concern(s) on the "
                           f"{self.client.backend} backend; the notebook stays usable meanwhile.")

    @guard
    def _stop(self, _button=None) -> None:
        self.runner.stop()
        self.stop_button.disabled = True
        self.feedback.info("Stopping: no new photos start; those already sent finish and are recorded.")

    # ---- called from the worker thread

    def _logged(self, level: int, text: str) -> None:
        """A record of the ``skinlab`` loggers during the run (say, the balance could not be fetched)."""
        (self.feedback.error if level >= logging.ERROR else self.feedback.warn)(text)

    @guard
    def _item_update(self, item) -> None:
        with self._lock:
            self._lines[item.index] = (f"<tr><td style='padding:1px 8px'>{html.escape(item.label)}</td>"
                                       f"<td style='padding:1px 8px'>{html.escape(logic.outcome_text(item))}</td></tr>")
            table = "".join(self._lines[i] for i in sorted(self._lines))
        self.items_html.value = f"<table class='skinlab-item-table' style='font-size:12px;line-height:1.4'>{table}</table>"
        if item.outcome in _FINAL:
            self._count_final(item)
        for callback in list(self._item_listeners):
            callback(item)

    def _count_final(self, item) -> None:
        with self._lock:
            self._final.add(item.index)
            n = len(self._final)
        self.progress.value = min(n, self.progress.max)
        self.progress_text.value = f"{n} of {self.progress.max}"

    @guard
    def _done(self, report) -> None:
        self.report = report
        for item in report.items:  # items that never reached on_update (not started) still count
            if item.outcome in _FINAL:
                self._count_final(item)
        failed = report.count("failed") + report.count("skipped")
        self.progress.bar_style = "success" if not failed and not report.stopped else "warning"
        (self.feedback.ok if not failed and not report.stopped else self.feedback.warn)(report.summary())

    @guard
    def _failed(self, exc: BaseException) -> None:
        self.progress.bar_style = "danger"
        self.feedback.show_exception(exc, "the submission")

    @guard
    def _finally(self) -> None:
        self.submit_button.disabled = False
        self.stop_button.disabled = True
        for callback in list(self._finish_listeners):
            callback(self.report if self.runner.error is None else None)
