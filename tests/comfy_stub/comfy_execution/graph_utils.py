"""Stand-in for ``comfy_execution.graph_utils.ExecutionBlocker`` (tests only)."""


class ExecutionBlocker:
    def __init__(self, message):
        self.message = message
