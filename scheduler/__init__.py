"""Scheduling, per instance and across instances.

- `local` and `policies`: the per-instance scheduler below the engine (FCFS,
  priority, fair; swap or recompute preemption).
- `instance`, `ray_instance`: one engine behind the `Instance` interface, on a
  local device or in a Ray actor.
- `migration`: the live-migration driver between two instances.
- `cluster`: the global scheduler above the engines (dispatch, migration
  policy, draining, crash recovery); `async_cluster` puts it behind the
  server's `sluice.runtime.frontend.FrontEnd` interface, as `AsyncEngine` is;
  `autoscale` resizes it (freeness, or the provisioner's re-planner through
  `fleet`).
"""
