"""RQ: a no-op job function (workers import it by its dotted path)."""


def noop() -> None:
    return None
