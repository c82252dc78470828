"""A pickle that runs code when loaded, for the tests that check fastdit never loads one."""


class WritesAFile:
    """Pickled, it loads as a call that creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
