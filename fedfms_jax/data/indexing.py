"""Index checking shared by the random-access example sources."""


def normalize_index(i: int, n: int) -> int:
    """Python-style index into a sequence of length n: negatives count from the end."""
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(i)
    return i
