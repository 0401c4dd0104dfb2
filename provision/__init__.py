"""SLO-driven provisioning over heterogeneous accelerators.

Modules: ``catalog`` (accelerator data, ``catalog.json``), ``workload`` (buckets,
workload file, SLOs), ``perfmodel`` (roofline step-time model), ``profiles``
(modelled / imported (Mélange) / measured max rates), ``planner`` (the integer
program), ``simulate`` (discrete-event check, re-solve with more headroom),
``replan`` (online re-planning with hysteresis, ``ScaleActuator`` protocol),
``cli`` (``sluice provision``).
"""
