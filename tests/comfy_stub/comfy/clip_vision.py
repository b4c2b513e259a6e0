"""Stand-in for ``comfy.clip_vision.Output`` (tests only)."""


class Output:
    def __getitem__(self, key):
        return getattr(self, key)

    def __setitem__(self, key, item):
        setattr(self, key, item)
