"""Test-session settings shared by every test module."""

import os
import tempfile

# JAX's persistent compilation cache defaults to the user's cache folder: the suite gets a
# fresh one of its own (the runs it starts as subprocesses inherit it), so it never reads or
# fills a user's cache, and every session starts cold.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="igpt-tests-cache-")

# Orbax's paths (etils.epath) read gs:// through tf.io.gfile when TensorFlow is installed, and
# etils decides that once per process (cached at the first gs:// path, by whichever test comes
# first); tf.io.gfile ignores STORAGE_EMULATOR_HOST. The object-storage tests need gcsfs there.
os.environ.setdefault("EPATH_USE_TF", "false")
