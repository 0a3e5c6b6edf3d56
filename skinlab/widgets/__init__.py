"""Notebook forms (ipywidgets 8): choose concerns and photos, submit, and follow the submissions.

One call gives the whole form::

    import skinlab
    skinlab.app(ledger="study/ledger.sqlite")

and each part works alone too:

* :class:`ActionPicker`: HD/SD switch, the concerns as grouped checkboxes, select all/none, the
  units estimate;
* :class:`ImagePicker`: upload, path/folder chooser, URL field, sample portraits, thumbnails and
  pre-flight verdicts;
* :class:`SubmitPanel`: tags, backend and cost, submit (in a worker thread), per-image progress;
* :class:`SubmissionsTable`: the ledger, filterable by status and tag;
* :class:`ResultViewer`: scores and masks of one submission.

Only standard ipywidgets 8 controls are used. The widgets hold no logic: their handlers call the
plain functions of :mod:`skinlab.widgets.logic`. Every message goes to the form's own output
area. ``skinlab app`` serves the same form as a page with Voilà.
"""

from ._base import Feedback, add_error_hook, remove_error_hook
from .action_picker import ActionPicker
from .form import App, app
from .image_picker import ImagePicker
from .submissions import ResultViewer, SubmissionsTable
from .submit_panel import SubmitPanel

__all__ = ["ActionPicker", "App", "Feedback", "ImagePicker", "ResultViewer", "SubmissionsTable", "SubmitPanel",
           "add_error_hook", "app", "remove_error_hook"]
