"""The names a serving option accepts, in a module that imports nothing, so
``sluice serve --help`` lists them without importing JAX, uvicorn or the
engine (issue 24). The modules that implement the options import these names
from here and check their arguments against them.
"""

COMPAT_MODES = ("vllm",)  # --metrics-compat: metric names offered besides sluice:'s
ACCESS_LOG_FORMATS = ("json", "text")  # --access-log
DISPATCH_POLICIES = ("freest", "least-loaded", "round-robin")  # --dispatch
AUTOSCALERS = ("freeness", "replan")  # --autoscale
