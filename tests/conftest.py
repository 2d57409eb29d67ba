"""Test-session settings shared by every test module."""

import os
import tempfile

# JAX's persistent compilation cache defaults to the user's cache folder: the suite gets a
# fresh one of its own (the runs it starts as subprocesses inherit it), so it never reads or
# fills a user's cache, and every session starts cold.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="igpt-tests-cache-")
