"""Tools for proving lock behaviour by what happened, never by how long it took."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Timeline:
    """Who entered and left the critical section of each key, in order."""

    events: list[tuple[str, str, object]] = field(default_factory=list)
    inside: dict[str, int] = field(default_factory=dict)
    most: dict[str, int] = field(default_factory=dict)

    def enter(self, key: str, who: object) -> None:
        self.events.append(("in", key, who))
        self.inside[key] = self.inside.get(key, 0) + 1
        self.most[key] = max(self.most.get(key, 0), self.inside[key])

    def leave(self, key: str, who: object) -> None:
        self.events.append(("out", key, who))
        self.inside[key] -= 1

    def entries(self, key: str | None = None) -> list[object]:
        """Who entered, in order (for one key, or all)."""
        return [who for kind, k, who in self.events if kind == "in" and key in (None, k)]

    def overlapped(self, a: object, b: object) -> bool:
        """Whether `a` and `b` were inside at the same time (over any keys)."""
        inside: set[object] = set()
        for kind, _, who in self.events:
            if kind == "in":
                inside.add(who)
                if {a, b} <= inside:
                    return True
            else:
                inside.discard(who)
        return False
