"""Stream positions across a change of world size: N ranks checkpointed, M ranks resume.

Each rank reads its own share of the source (``PatternSource`` and ``FolderSource`` split shards by rank; the
ranks of a Redis source are consumers of one group) and checkpoints its own ``SampleStream`` position. With
the same number of ranks each takes its own back. With another number, ``merge_positions`` gives new rank
``r`` a position that loses no shard (delivery stays at-least-once; a few shards may be read twice):

- pattern: the earliest shard not finished on any old rank, as an index into the pass, maps to the index
  from which every new rank's share covers all later shards; shards open mid-way are re-read from the start.
- folder: the shards finished on any rank stay finished; an open shard goes on with new rank ``k % M`` (old
  rank ``k``), which resumes it mid-shard.
- Redis: old rank ``k``'s open entries go to new rank ``k % M``, which claims and resumes them; entries
  pending on consumers that are gone are re-claimed after ``source.claim_idle_s``, as after any crash.
"""

from __future__ import annotations

from typing import Any


def merge_positions(positions: list[dict[str, Any] | None], rank: int, world: int) -> dict[str, Any] | None:
    """New rank ``rank`` of ``world``'s position from the positions of every old rank (in old-rank order)."""
    known = [p for p in positions if p is not None]
    if not known:
        return None
    mine = [p for k, p in enumerate(positions) if p is not None and k % world == rank]
    kind = known[0].get("source", {}).get("kind")
    out: dict[str, Any] = {"open": [], "unacked": [u for p in mine for u in p.get("unacked", ())],
                           "n_samples": sum(int(p.get("n_samples", 0)) for p in mine),
                           "n_shards_done": sum(int(p.get("n_shards_done", 0)) for p in mine)}
    if kind == "pattern":
        out["source"] = _pattern_start(positions, world)
        return out
    out["open"] = [shard for p in mine for shard in p.get("open", ())]
    if kind == "folder":
        out["source"] = {"kind": "folder", "done": sorted({n for p in known for n in p["source"].get("done", ())}),
                         "open": sorted({n for p in mine for n in p["source"].get("open", ())})}
    else:  # redis
        out["source"] = {"kind": kind, "open": [e for p in mine for e in p["source"].get("open", ())]}
    return out


def _pattern_start(positions: list[dict[str, Any] | None], world: int) -> dict[str, Any]:
    """Old rank ``k`` of ``N`` reads indices ``k, k + N, ...`` of each pass; all indices below ``N * n`` are
    finished when every old rank finished its first ``n``. New rank ``r`` of ``M`` starting at local index
    ``floor(N * n / M)`` covers every index from ``M * floor(N * n / M) <= N * n`` on: nothing is skipped."""
    old = len(positions)
    earliest = min(((int(p["source"].get("pass", 0)), int(p["source"].get("next", 0)) - len(p.get("open", ())))
                    if p is not None else (0, 0)) for p in positions)  # None: that rank had trained nothing
    pass_index, finished = earliest[0], max(0, earliest[1])
    return {"kind": "pattern", "pass": pass_index, "next": old * finished // world}


__all__ = ["merge_positions"]
