"""Run with 2 fake CPU devices (tests/test_probe.py does): sharded probes == one device.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/probe_sharding_check.py

Pooled features with the batch split over fsdp=2 (11 rows in batches of 4: a padded last
batch) equal the single-device ones, and the L-BFGS probe with its rows sharded reaches the
same loss. Prints "ok".
"""

import os
import sys

import jax
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_probe as tp  # noqa: E402

from igpt import features, linear_probe, sharding  # noqa: E402


def main():
  assert jax.device_count() == 2, jax.devices()
  params = tp._init(tp.CFG, 1)  # pylint: disable=protected-access
  source = tp._token_source(11)  # pylint: disable=protected-access
  one = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)),
                           jax.devices()[:1])
  two = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=2, tensor=1)))
  f1, y1 = features.FeatureExtractor(tp.CFG, params, None, one, batch_size=4).compute(source,
                                                                                       [0, 2])
  f2, y2 = features.FeatureExtractor(tp.CFG, params, None, two, batch_size=4).compute(source,
                                                                                       [0, 2])
  np.testing.assert_allclose(f1, f2, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y1, y2)
  data = tp._separable(n=301)  # pylint: disable=protected-access
  a = linear_probe.fit(data, 4, 0.01, tol=1e-7)
  b = linear_probe.fit(data, 4, 0.01, tol=1e-7, mesh=two)
  assert abs(a.loss - b.loss) <= 1e-5 * a.loss, (a.loss, b.loss)
  assert a.accuracy(data) == b.accuracy(data)
  print("ok")


if __name__ == "__main__":
  main()
