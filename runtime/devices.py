"""Which device a runtime object lands on when the caller names none.

``default_device()`` is JAX's default device: the ``jax.default_device`` context's or
the ``jax_default_device`` setting's (a device, or a platform name: that platform's
first local device), else the first local device. Weights (`checkpoint.to_device`),
the KV pool (`model_runner.ModelRunner`) and the engine's memory sizing all use it, so
an engine built inside ``with jax.default_device(d)`` keeps everything on ``d``.
"""

from __future__ import annotations

import jax


def default_device() -> jax.Device:
    device = jax.config.jax_default_device
    if device is None or isinstance(device, str):
        device = jax.local_devices(backend=device)[0]
    return device
