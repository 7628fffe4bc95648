"""Errors raised by the communication layer. Every one names what failed and where."""


class CommError(RuntimeError):
    """A collective or point-to-point op failed: peer lost, deadline passed, bad frame."""

    def __init__(self, message, *, op=None, group=None, peer=None, host=None):
        parts = [message]
        where = []
        if op is not None:
            where.append(f"op={op}")
        if group is not None:
            where.append(f"group={group}")
        if peer is not None:
            where.append(f"peer rank={peer}")
        if host is not None:
            where.append(f"host={host}")
        if where:
            parts.append("(" + ", ".join(where) + ")")
        super().__init__(" ".join(parts))
        self.detail = message  # the message without the "(op=..., ...)" suffix, for re-wrapping
        self.op, self.group, self.peer, self.host = op, group, peer, host


class CommTimeout(CommError):
    """A blocking call passed its deadline."""


class PeerLost(CommError):
    """The peer closed its connection or died."""


class FrameError(CommError):
    """A frame's tag or length did not match what the receiver expected."""


class TransportUnavailable(RuntimeError):
    """A forced transport cannot work here; the message lists what was checked."""
