"""A clock a test sets by hand: inject it where code takes `clock`, then move `t`."""


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t
