"""Stand-in for ``comfy.utils.ProgressBar``: records updates, and like ComfyUI's hook each
update is a cancel point (raises when ``model_management`` is interrupted)."""

from . import model_management

UPDATES: list[tuple[int, int]] = []


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        UPDATES.append((self.current, self.total))
        model_management.throw_exception_if_processing_interrupted()

    def update(self, value):
        self.update_absolute(self.current + value)
