"""The image picker: upload, a path/folder chooser, a URL field and the bundled sample portraits."""

from __future__ import annotations

import html
import os
from typing import Callable

import ipywidgets as widgets

from . import logic
from ._base import Feedback, guard

__all__ = ["ImagePicker"]


class ImagePicker(widgets.VBox):
    """Choose the photos to analyse, and see before submitting which ones the service would reject.

    Four ways in: the upload button, a path or folder (typed, or browsed in the list below it), an
    http(s) URL, and a bundled public-domain sample portrait. Each photo gets an upright thumbnail
    and its pre-flight verdict for the current tier. Uploaded bytes are read into Python and then
    removed from the upload widget. The thumbnails are widget state, which Jupyter saves into the
    notebook only with "Save Widget State Automatically" on (off by default): :meth:`clear_images`
    or :meth:`close` empties them, and the note under the upload button says so.

    Parameters
    ----------
    tier : {"sd", "hd"}
        Pre-flight checks the tier's minimum size; :meth:`set_tier` checks again.
    start_dir : str, optional
        Where the path chooser starts (default: the working directory).
    upload_limit_mb : float
        The notebook server's upload limit to state (10 MiB, Tornado's default
        ``websocket_max_message_size``, unless the server was started with another).
    upload : widget, optional
        The upload widget to use (default: a new ``ipywidgets.FileUpload``); its ``value`` may
        be in the ipywidgets 8 format (tuple of dicts) or the ipywidgets 7 one (dict).

    Attributes
    ----------
    items : list of :class:`~skinlab.widgets.logic.ImageItem`
    upload, path, browse, add_path_button, url, add_url_button, sample, add_sample_button,
    clear_button : the controls
    """

    def __init__(self, tier: str = "sd", *, start_dir: str | None = None,
                 upload_limit_mb: float = logic.UPLOAD_LIMIT_MB, upload=None, feedback: Feedback | None = None,
                 **kwargs) -> None:
        own_feedback = feedback is None
        self.feedback = feedback or Feedback()
        self.tier = tier
        self.items: list[logic.ImageItem] = []
        self._rows: dict[str, widgets.Widget] = {}
        self._listeners: list[Callable[["ImagePicker"], None]] = []
        self._browsing = False

        self.upload = upload if upload is not None else widgets.FileUpload(
            accept="image/*,.jpg,.jpeg,.png,.heic,.heif", multiple=True, description="Upload photos")
        self.upload.add_class("skinlab-upload")
        self.upload.observe(self._uploaded, names="value")
        self.upload_note = widgets.HTML(
            "<div style='color:#555;font-size:12px;line-height:1.4;max-width:760px'>"
            + html.escape(logic.upload_limit_text(upload_limit_mb)) + "<br>"
            + html.escape(logic.widget_state_text()) + "</div>")
        self.upload_note.add_class("skinlab-upload-note")

        start = os.path.abspath(os.path.expanduser(start_dir or os.getcwd()))
        self.path = widgets.Text(value=start, description="Path", placeholder="a photo, or a folder of photos",
                                 layout=widgets.Layout(width="520px"))
        self.path.add_class("skinlab-path")
        self.add_path_button = widgets.Button(description="Add path", icon="folder-open",
                                              tooltip="Add this photo, or every JPEG/PNG in this folder")
        self.add_path_button.add_class("skinlab-add-path")
        self.add_path_button.on_click(self._add_path)
        self.browse = widgets.Select(options=[], rows=6, description="Browse",
                                     layout=widgets.Layout(width="520px"))
        self.browse.add_class("skinlab-browse")
        self.browse.observe(self._browsed, names="value")
        self.path.observe(self._path_typed, names="value")

        self.url = widgets.Text(description="URL", placeholder="https://.../photo.jpg",
                                layout=widgets.Layout(width="520px"))
        self.url.add_class("skinlab-url")
        self.add_url_button = widgets.Button(description="Add URL", icon="link")
        self.add_url_button.add_class("skinlab-add-url")
        self.add_url_button.on_click(self._add_url)

        from ..samples import SAMPLES

        self.sample = widgets.Dropdown(options=[(s.replace("_", " ").title(), s) for s in SAMPLES],
                                       description="Sample", layout=widgets.Layout(width="300px"))
        self.sample.add_class("skinlab-sample")
        self.add_sample_button = widgets.Button(description="Add sample portrait", icon="user",
                                                layout=widgets.Layout(width="200px"),
                                                tooltip="A public-domain portrait bundled with scikit-image or "
                                                        "matplotlib, cropped to the face")
        self.add_sample_button.add_class("skinlab-add-sample")
        self.add_sample_button.on_click(self._add_sample)

        self.clear_button = widgets.Button(description="Clear list", icon="trash")
        self.clear_button.add_class("skinlab-clear-images")
        self.clear_button.on_click(self._clear)
        self.summary = widgets.HTML()
        self.summary.add_class("skinlab-images-summary")
        self.list_box = widgets.VBox()
        self.list_box.add_class("skinlab-image-list")

        super().__init__([
            widgets.HBox([self.upload]), self.upload_note,
            widgets.HBox([self.path, self.add_path_button]), self.browse,
            widgets.HBox([self.url, self.add_url_button]),
            widgets.HBox([self.sample, self.add_sample_button]),
            widgets.HBox([self.summary, self.clear_button], layout=widgets.Layout(align_items="center")),
            self.list_box,
        ] + ([self.feedback.output] if own_feedback else []), **kwargs)
        self.add_class("skinlab-image-picker")
        self._list_folder(start)
        self._render()

    # ---- what the rest of the form reads

    @property
    def ready(self) -> list[logic.ImageItem]:
        """Photos that pass pre-flight (and URLs, which only the service can check)."""
        return [i for i in self.items if i.ok is not False]

    def sources(self) -> list:
        return [i.source() for i in self.ready]

    def on_change(self, callback: Callable[["ImagePicker"], None]) -> None:
        """Call ``callback(picker)`` after the list of photos changes."""
        self._listeners.append(callback)

    @guard
    def set_tier(self, tier: str) -> None:
        """Check every photo again for ``tier`` (samples are regenerated at the tier's size)."""
        if tier == self.tier:
            return
        self.tier = tier
        for item in self.items:
            logic.retier_item(item, tier)
            self._drop_row(item.key)
        self._render()
        rejected = [i for i in self.items if i.ok is False]
        if rejected:
            self.feedback.warn(f"{len(rejected)} photo(s) do not fit {tier.upper()}; see the list.")

    def image_widgets(self) -> list[widgets.Image]:
        """The thumbnail widgets shown now (their ``value`` is a PNG of the photo)."""
        return [row.children[0] for row in self._rows.values()
                if row.children and isinstance(row.children[0], widgets.Image)]

    def clear_images(self) -> None:
        """Empty the thumbnails (the list stays, each row says "preview cleared"), so no picture of
        a face is left in the widget state."""
        for row in list(self._rows.values()):
            if row.children and isinstance(row.children[0], widgets.Image):
                thumb = row.children[0]
                thumb.value = b""
                row.children = (widgets.HTML("<div style='width:64px;color:#999;font-size:11px'>preview "
                                             "cleared</div>"),) + tuple(row.children[1:])
                thumb.close()
        for item in self.items:
            item.thumbnail = None  # rows drawn again (tier switch) stay without a preview

    def close(self) -> None:
        """Empty the thumbnails, then close the picker and its list."""
        self.clear_images()
        for key in list(self._rows):
            self._drop_row(key)
        super().close()

    def add_items(self, items: list[logic.ImageItem]) -> None:
        known = {i.key for i in self.items}
        added = 0
        for item in items:
            if item.key in known:
                self.feedback.info(f"{item.label} is already in the list.")
                continue
            known.add(item.key)
            self.items.append(item)
            added += 1
            if item.ok is False:
                self.feedback.warn(f"{item.label}: {item.message}")
        self._render()

    # ---- handlers

    @guard
    def _uploaded(self, change) -> None:
        entries = logic.upload_entries(change["new"])
        if not entries:
            return  # the widget was just cleared
        try:
            items = [logic.item_from_upload(e.name, e.data, self.tier) for e in entries]
        finally:
            logic.clear_upload(self.upload)
        self.feedback.info(f"Read {len(entries)} uploaded file(s); their bytes were removed from the upload widget "
                           "(the thumbnails stay in the widget state: see the note under the upload button).")
        self.add_items(items)

    @guard
    def _add_path(self, _button=None) -> None:
        items = logic.items_from_path(self.path.value, self.tier)
        self.add_items(items)

    @guard
    def _add_url(self, _button=None) -> None:
        self.add_items([logic.item_from_url(self.url.value)])
        self.url.value = ""

    @guard
    def _add_sample(self, _button=None) -> None:
        self.add_items([logic.item_from_sample(self.sample.value, self.tier)])

    @guard
    def _clear(self, _button=None) -> None:
        self.items.clear()
        for key in list(self._rows):
            self._drop_row(key)
        self._render()

    @guard
    def _remove(self, key: str) -> None:
        self.items = [i for i in self.items if i.key != key]
        self._drop_row(key)
        self._render()

    @guard
    def _path_typed(self, change) -> None:
        if not self._browsing and os.path.isdir(os.path.expanduser(change["new"] or "")):
            self._list_folder(change["new"])

    @guard
    def _browsed(self, change) -> None:
        if self._browsing or change["new"] is None:
            return
        target = change["new"]
        self._browsing = True
        try:
            self.path.value = target
            if os.path.isdir(target):
                self._list_folder(target)
        finally:
            self._browsing = False

    def _list_folder(self, path: str) -> None:
        _folder, entries = logic.list_folder(path)
        was = self._browsing
        self._browsing = True
        try:
            self.browse.options = entries
            self.browse.value = None
        finally:
            self._browsing = was

    # ---- the list

    def _drop_row(self, key: str) -> None:
        row = self._rows.pop(key, None)
        if row is not None:
            for child in row.children:
                child.close()
            row.close()

    def _row(self, item: logic.ImageItem) -> widgets.Widget:
        if item.thumbnail:
            thumb = widgets.Image(value=item.thumbnail, format="png",
                                  layout=widgets.Layout(width="64px", max_height="96px", object_fit="contain"))
        else:
            thumb = widgets.HTML("<div style='width:64px;color:#999;font-size:11px'>no preview</div>")
        colour = {True: "#009E73", False: "#D55E00", None: "#B35900"}[item.ok]
        mark = {True: "\u2714", False: "\u2716", None: "?"}[item.ok]
        text = (f"<div style='font-size:12px;line-height:1.4;max-width:640px'><b>{html.escape(item.label)}</b> "
                f"<span style='color:#777'>({item.kind})</span><br><span style='color:{colour}'>{mark} "
                f"{html.escape(item.message)}</span>")
        if item.changes:
            text += ("<br><span style='color:#555'>pre-flight will: "
                     + html.escape("; ".join(item.changes)) + "</span>")
        text += "</div>"
        remove = widgets.Button(description="Remove", layout=widgets.Layout(width="80px"))
        remove.on_click(lambda _b, key=item.key: self._remove(key))
        row = widgets.HBox([thumb, widgets.HTML(text), remove], layout=widgets.Layout(align_items="center"))
        row.add_class("skinlab-image-row")
        row.add_class(f"skinlab-image-{item.status}")
        return row

    def _render(self) -> None:
        rows = []
        for item in self.items:
            if item.key not in self._rows:
                self._rows[item.key] = self._row(item)
            rows.append(self._rows[item.key])
        self.list_box.children = rows
        ready = sum(1 for i in self.items if i.ok is not False)
        rejected = sum(1 for i in self.items if i.ok is False)
        if not self.items:
            text = "No photos chosen yet."
        else:
            text = f"{ready} photo(s) to submit" + (f"; {rejected} rejected by pre-flight (left out)" if rejected else "")
        self.summary.value = f"<b>{html.escape(text)}</b>"
        for callback in list(self._listeners):
            callback(self)
