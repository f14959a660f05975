"""What the Ray tests share: the environment their Ray runs in and the fast atlas settings.

Token auth with a throwaway token (nothing written to ~/.ray), no usage stats, fast node-death
detection. One token per test process: Ray's driver reads it once, and GCS servers started later
must match it. Import ``ray_env`` into a test module to apply it there (autouse, per module).
"""

from __future__ import annotations

import os
import secrets

import pytest

TOKEN = os.environ.setdefault("SSL_MEDSAM2_TEST_RAY_TOKEN", secrets.token_hex(16))
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
#: the atlas engine at a 64x64 in-plane size: a few seconds per query on one core; one thread, so that
#: in-process and worker registrations sum alike (deterministic results)
FAST_ATLAS = {"atlas.threads": "1", "atlas.demons_iterations": "[20,10]", "atlas.demons_shrink": "[2,1]",
              "atlas.affine_iterations": "50", "atlas.affine_shrink": "[2,1]", "atlas.affine_smooth_mm": "[2.0,1.0]",
              "atlas.organ_matched_pass": "false"}
#: the same as config overrides, engine included
ATLAS = ["protocol.engine=atlas", *(f"{k}={v}" for k, v in FAST_ATLAS.items())]


@pytest.fixture(scope="module", autouse=True)
def ray_env():
    """RAY_ENV set for the module's tests, Ray stopped and the environment restored after them."""
    old = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
