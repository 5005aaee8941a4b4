"""Paths of the run's outputs and of its data: a local path, or a URI that `etils.epath` opens
(`gs://bucket/dir` on Google Cloud Storage, `s3://`, `az://`, ...; the same paths orbax and tfds take).

A local path has `~` expanded and is made absolute (`resolve`); a URI is kept as given. Every read
and write of the workdir and of the data folders goes through `epath.Path` (`as_path`), so the code is
the same for both. Writing a whole file is atomic on both (`write_atomically`): a local file through a
temporary file and a rename, an object store's object by its upload.

Reading `gs://` needs an epath backend: `gcsfs` (`pip install jaxcl[gcs]`) or TensorFlow's gfile.
"""

from __future__ import annotations

import os

from etils import epath

GCS_HINT = ("gs:// paths are read and written through etils.epath, which needs gcsfs (`pip install "
            "'jaxcl[gcs]'`, or `pip install gcsfs google-cloud-storage`) or TensorFlow, and credentials "
            "for the bucket (on a Cloud TPU VM, its service account).")


def is_local(path: str | os.PathLike[str]) -> bool:
  """Whether `path` is a local path rather than a URI `scheme://...`.

  >>> is_local("~/runs/a"), is_local("gs://bucket/runs/a")
  (True, False)
  """
  return "://" not in os.fspath(path)


def resolve(path: str | os.PathLike[str]) -> str:
  """A local path with `~` expanded, made absolute; a URI as given, without a trailing "/".

  >>> resolve("gs://bucket/runs/a/")
  'gs://bucket/runs/a'
  >>> resolve("/tmp/x/../y")
  '/tmp/y'
  """
  path = os.fspath(path)
  if is_local(path):
    return os.path.abspath(os.path.expanduser(path))
  return path.rstrip("/") if not path.endswith("://") else path


def as_path(path: str | os.PathLike[str]) -> epath.Path:
  """`epath.Path(resolve(path))`: the object every read and write of a run's files goes through."""
  return epath.Path(resolve(path))


def write_atomically(path: str | os.PathLike[str], text: str) -> None:
  """Writes `text` (UTF-8) to `path` so that a reader sees the old content or the new, never part.

  Local: a temporary file next to it, flushed to disk and renamed over it (removed again when the write
  fails, for instance on a full disk or a SIGTERM). A URI: one upload of the whole object, which object
  stores make visible only when complete.
  """
  path = os.fspath(path)
  if not is_local(path):
    epath.Path(path).write_text(text)
    return
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:  # a full disk, a SIGTERM: leave no temporary file behind
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
