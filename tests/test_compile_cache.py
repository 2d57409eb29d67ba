"""The persistent compilation cache: a second process loads what the first compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import train_helpers as th

# Compiles one small jitted function with the cache set to argv[1] ("" = the default folder)
# and prints what `watch()` saw. Each run is a fresh process: JAX's in-memory cache is empty.
_COMPILE = """
import json, sys
import jax, jax.numpy as jnp
from igpt import compile_cache
folder = compile_cache.enable(sys.argv[1])
assert compile_cache.enable(sys.argv[1]) == folder  # twice changes nothing
x = jax.ShapeDtypeStruct((16,), jnp.float32)
with compile_cache.watch() as compiled:
  jax.jit(lambda v: jnp.tanh(v) * 3 + 1).lower(x).compile()
print(json.dumps({"folder": folder, "outcome": compiled.outcome, "hits": compiled.hits,
                  "lookups": compiled.lookups, "written": compiled.written,
                  "line": compile_cache.describe(compiled)}))
"""


def _compile_in_fresh_process(cache_arg: str, **env) -> dict:
  proc = subprocess.run([sys.executable, "-c", _COMPILE, cache_arg], env=th.env(**env),
                        cwd=th.REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "stderr": proc.stderr}


@pytest.mark.slow
def test_restarts_hit_and_a_cut_off_entry_is_written_again(tmp_path):
  folder = str(tmp_path / "cache")
  first = _compile_in_fresh_process(folder)
  assert first["folder"] == folder
  assert (first["outcome"], first["hits"]) == ("miss", 0) and first["written"] >= 1
  entries = os.listdir(folder)
  second = _compile_in_fresh_process(folder)
  assert (second["outcome"], second["hits"]) == ("hit", second["lookups"])
  assert second["line"].endswith(f"(compilation cache hit, {folder})")

  # A run killed while JAX wrote an entry leaves it cut off; JAX alone would warn and
  # recompile at every start from then on.
  [program] = entries
  with open(os.path.join(folder, program), "r+b") as f:
    f.truncate(50)
  third = _compile_in_fresh_process(folder)
  assert third["outcome"] == "miss"
  assert third["line"].endswith(f"(compilation cache entry damaged, removed from {folder})")
  assert "could not be read" in third["stderr"] and "UserWarning" not in third["stderr"]
  assert program not in os.listdir(folder)
  fourth = _compile_in_fresh_process(folder)
  assert fourth["outcome"] == "miss" and fourth["written"] and os.listdir(folder) == entries
  assert "could not be read" not in fourth["stderr"]


def test_empty_means_the_user_cache_folder(tmp_path):
  result = _compile_in_fresh_process("", XDG_CACHE_HOME=str(tmp_path))
  assert result["folder"] == str(tmp_path / "igpt" / "jax")
  assert result["outcome"] == "miss" and os.listdir(result["folder"])


def test_off_writes_nothing_even_with_jax_own_setting(tmp_path):
  folder = tmp_path / "cache"
  folder.mkdir()
  result = _compile_in_fresh_process("off", XDG_CACHE_HOME=str(tmp_path / "xdg"),
                                     JAX_COMPILATION_CACHE_DIR=str(folder))
  assert result["folder"] is None and result["outcome"] == "off"
  assert result["line"].endswith("(compilation cache off)")
  assert not os.listdir(folder) and not (tmp_path / "xdg").exists()


def test_a_named_folder_that_cannot_be_made_is_a_user_error(tmp_path):
  from igpt import compile_cache  # noqa: PLC0415
  from igpt.errors import UserError  # noqa: PLC0415

  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(UserError, match="cannot be created"):
    compile_cache.enable(str(blocker / "cache"))
