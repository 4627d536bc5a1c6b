"""Nodes across planes: every plane of a gateway serves every node of an org, whichever plane the node dialled.

Planes talk over NATS (core subjects, nothing persisted; bench/broker.py measured it against Redis Streams):

- each plane advertises its own nodes (capacity, busy slots, state) on `<prefix>.fleet.ads`, at once when they
  change and in full every `AD_INTERVAL_S`; the other planes hold them as sessions of their `NodeRegistry`
  (`RemoteSession`), so routing, queueing and affinity see the whole fleet;
- a plane that picks a node of another plane asks that plane to run the job (`<prefix>.plane.<id>.jobs`); the
  node's own plane claims the slot, as for a local request, so a slot is claimed once fleet-wide, and refuses
  when another plane's request took the last one first (the asking plane picks again);
- the node's events come back on the asking plane's `<prefix>.plane.<id>.events`, cancels go the other way.

A plane whose advertisements stop for `AD_EXPIRY` intervals is gone: its nodes' jobs fail over like any node
loss, and the jobs it asked others to run are cancelled. Planes trust each other: NATS must be private to them.
"""
