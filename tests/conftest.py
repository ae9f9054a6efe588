"""Shared test set-up.

Eight simulated CPU devices let the data-parallel path be tested on one machine; the flag must be
set before JAX is first imported, which is why it lives here.
"""

import fcntl
import os
import pathlib
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny step functions; a shared persistent cache compiles each once.
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "bucketed-rnn-test-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="session")
def iam_ondb_dir() -> pathlib.Path:
  """The real IAM-OnDB download; skips when `IAM_ONDB_DIR` is unset, fails when it is unusable."""
  value = os.environ.get("IAM_ONDB_DIR")
  if not value:
    pytest.skip("IAM_ONDB_DIR is not set")
  path = pathlib.Path(value)
  required = [
    "lineStrokes-all.tar.gz",
    "ascii-all.tar.gz",
    "trainset.txt",
    "testset_v.txt",
    "testset_t.txt",
    "testset_f.txt",
  ]
  missing = [name for name in required if not (path / name).exists()]
  if missing:
    pytest.fail(f"IAM_ONDB_DIR={path} is set but lacks {', '.join(missing)}")
  return path


@pytest.fixture(scope="session")
def built_data_dir(iam_ondb_dir, tmp_path_factory):
  """A data dir holding the built TFDS `iam_ondb` and its .npz export.

  Built once per test session (~1 min on 2 cores) and shared by the pytest-xdist workers through a
  lock file in the session's base temp dir.
  """
  from handwriting import dataset

  shared = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's base temp dir is inside the session's
    shared = shared.parent
  data_dir = shared / "iam_ondb_data"
  with open(shared / "iam_ondb_data.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (data_dir / "iam_ondb.npz").is_file():
      dataset.build_iam_ondb(iam_ondb_dir, data_dir)
  return data_dir


@pytest.fixture(autouse=True)
def restore_the_compilation_cache():
  """Puts the persistent compilation cache back as the session set it after each test: a test whose
  config turns it off or moves it (`train.setup_runtime`) would otherwise leave every later test
  of its worker compiling cold."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  settings = ("jax_enable_compilation_cache", "jax_compilation_cache_dir")
  before = [getattr(jax.config, name) for name in settings]
  yield
  if [getattr(jax.config, name) for name in settings] != before:
    for name, value in zip(settings, before, strict=True):
      jax.config.update(name, value)
    compilation_cache.reset_cache()
