"""Integer arithmetic every room uses (kernels keep their own: they import nothing of ropeway)."""


def cdiv(a: int, b: int) -> int:
    """a / b rounded up, for non-negative a and positive b."""
    return (a + b - 1) // b


def round_up(a: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is at least a."""
    return cdiv(a, multiple) * multiple
