"""The environment `deploy` starts a local Ray head with (ray_dstack/deploy/local.py)."""

from __future__ import annotations

import os
import subprocess

from ray_dstack.deploy.local import HAPROXY_WRAPPER, haproxy_wrapper_env


def test_serves_haproxy_is_started_through_ray_dstacks_wrapper():
    path = haproxy_wrapper_env()["RAY_SERVE_HAPROXY_BINARY_PATH"]
    assert os.path.basename(path) == HAPROXY_WRAPPER and os.access(path, os.X_OK)
    # The wrapper hands its arguments to Ray's haproxy: `-v` prints haproxy's version.
    out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "HAProxy version" in out.stdout, out.stdout + out.stderr
