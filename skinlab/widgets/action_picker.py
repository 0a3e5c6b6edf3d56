"""The action picker: HD/SD switch, the concerns as grouped checkboxes, select all/none, units."""

from __future__ import annotations

import html
from typing import Callable, Iterable

import ipywidgets as widgets

from . import logic
from ._base import Feedback, guard

__all__ = ["ActionPicker"]


class ActionPicker(widgets.VBox):
    """Choose the concerns to analyse and the tier (SD or HD).

    The checkboxes are concerns, not action names; :attr:`selected` maps them to the chosen tier.
    A selection therefore always has one tier: mixing HD and SD cannot be expressed.

    Parameters
    ----------
    tier : {"sd", "hd"}
    concerns : iterable of str
        Concerns ticked at the start (``"wrinkle"``, ``"pore"``, ...).

    Attributes
    ----------
    tier_toggle : ToggleButtons
    checkboxes : dict of concern -> Checkbox
    all_button, none_button : Button
    units : HTML
        The live units estimate.
    """

    def __init__(self, tier: str = "sd", concerns: Iterable[str] = (), *, feedback: Feedback | None = None,
                 **kwargs) -> None:
        own_feedback = feedback is None
        self.feedback = feedback or Feedback()
        self._listeners: list[Callable[["ActionPicker"], None]] = []
        self.tier_toggle = widgets.ToggleButtons(
            options=[("SD: photos 480 px and up", "sd"), ("HD: photos 1080 px and up", "hd")],
            value=tier, description="Tier", tooltips=["Standard definition", "High definition, finer detail"],
            style={"button_width": "210px"})
        self.tier_toggle.add_class("skinlab-tier")
        self.checkboxes: dict[str, widgets.Checkbox] = {}
        self._descriptions: dict[str, widgets.HTML] = {}
        chosen = set(concerns)
        groups = []
        for group, rows in logic.concern_rows(tier):
            lines = [widgets.HTML(f"<b>{html.escape(group)}</b>")]
            for concern, label, text in rows:
                box = widgets.Checkbox(value=concern in chosen, description=label, indent=False,
                                       layout=widgets.Layout(width="170px"))
                box.add_class(f"skinlab-concern-{concern}")
                box.observe(self._changed, names="value")
                desc = widgets.HTML(self._desc(text), layout=widgets.Layout(width="280px"))
                self.checkboxes[concern] = box
                self._descriptions[concern] = desc
                lines.append(widgets.HBox([box, desc]))
            groups.append(widgets.VBox(lines, layout=widgets.Layout(margin="0 24px 8px 0")))
        self.all_button = widgets.Button(description="Select all", icon="check-square",
                                         layout=widgets.Layout(width="120px"))
        self.none_button = widgets.Button(description="Select none", icon="square",
                                          layout=widgets.Layout(width="120px"))
        self.all_button.add_class("skinlab-select-all")
        self.none_button.add_class("skinlab-select-none")
        self.all_button.on_click(self._select_all)
        self.none_button.on_click(self._select_none)
        self.units = widgets.HTML()
        self.units.add_class("skinlab-units")
        self.tier_toggle.observe(self._tier_changed, names="value")
        super().__init__([
            self.tier_toggle,
            widgets.HBox(groups, layout=widgets.Layout(flex_flow="row wrap")),
            widgets.HBox([self.all_button, self.none_button, self.units],
                         layout=widgets.Layout(align_items="center")),
        ] + ([self.feedback.output] if own_feedback else []), **kwargs)
        self.add_class("skinlab-action-picker")
        self._refresh_units()

    # ---- what the rest of the form reads

    @property
    def tier(self) -> str:
        return self.tier_toggle.value

    @property
    def concerns(self) -> list[str]:
        return [c for c, box in self.checkboxes.items() if box.value]

    @property
    def selected(self) -> list[str]:
        """The action names to send: the ticked concerns in the chosen tier."""
        return logic.selected_actions(self.concerns, self.tier)

    def on_change(self, callback: Callable[["ActionPicker"], None]) -> None:
        """Call ``callback(picker)`` after the tier or the selection changes."""
        self._listeners.append(callback)

    # ---- handlers

    @staticmethod
    def _desc(text: str) -> str:
        return f"<div style='color:#555;font-size:12px;line-height:1.4;padding-top:6px'>{html.escape(text)}</div>"

    def _notify(self) -> None:
        self._refresh_units()
        for callback in list(self._listeners):
            callback(self)

    def _refresh_units(self) -> None:
        self.units.value = f"<span style='margin-left:12px'>{html.escape(logic.units_summary(self.selected))}</span>"

    @guard
    def _changed(self, change) -> None:
        if not getattr(self, "_bulk", False):
            self._notify()

    @guard
    def _tier_changed(self, change) -> None:
        for _, rows in logic.concern_rows(self.tier):
            for concern, _, text in rows:
                self._descriptions[concern].value = self._desc(text)
        self._notify()

    def _set_all(self, value: bool) -> None:
        self._bulk = True
        try:
            for box in self.checkboxes.values():
                box.value = value
        finally:
            self._bulk = False
        self._notify()

    @guard
    def _select_all(self, _button=None) -> None:
        self._set_all(True)

    @guard
    def _select_none(self, _button=None) -> None:
        self._set_all(False)
