"""Find the deployment tools the tests run natively (Debian's docker-compose and prometheus).

Locally a missing tool skips its tests; in CI (.ci/run installs both) it is an error, so these
tests can never pass by not running.
"""

import os
import shutil

import pytest


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is not installed; .ci/run installs it (apt-get install {tool})")
        pytest.skip(f"{tool} is not installed (apt-get install {tool})")
    return path
