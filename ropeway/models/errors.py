class ModelLoadError(ValueError):
    """A model file or directory that ropeway cannot load; the message names the problem."""
