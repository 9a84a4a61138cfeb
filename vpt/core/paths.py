"""Paths: every file vpt reads or writes goes through `etils.epath`, local or cloud (`gs://`, `s3://`).

`etils.epath` is the path library orbax, grain and tfds already use; `gs://` goes through fsspec
(gcsfs). Two properties of object stores shape the helpers here:
* there are no directories to create and no append: `open(..., "a")` and `os.makedirs` must never
  see a cloud path (Python would create a local directory literally named `gs:`);
* an object appears whole when its upload completes, so a plain write is already atomic there,
  while a local file is written to a temporary name and renamed.
`file://` URLs are accepted and mean the local path.
"""

from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """A URL path (`gs://bucket/...`, `s3://...`): an object store, not the local filesystem."""
  return "://" in os.fspath(path) and not os.fspath(path).startswith("file://")


def path(p: PathLike) -> epath.Path:
  """`p` as an epath.Path: cloud URLs kept as they are, local paths made absolute (orbax refuses
  relative paths), `file:///x` read as `/x`."""
  s = os.fspath(p)
  if s.startswith("file://"):
    s = s[len("file://"):]
  if is_remote(s):
    return epath.Path(s)
  return epath.Path(os.path.abspath(os.path.expanduser(s)))


def norm(p: PathLike) -> str:
  """`path(p)` as a string (for APIs and configs that take strings)."""
  return os.fspath(path(p))


def makedirs(p: PathLike) -> epath.Path:
  """Creates a local directory (and its parents); object stores have none to create."""
  p = path(p)
  if not is_remote(p):
    p.mkdir(parents=True, exist_ok=True)
  return p


def write_atomic(p: PathLike, data: bytes | str) -> None:
  """Writes the whole file so that readers (other hosts) see the old contents or the new, never a
  part: a temporary file renamed into place locally, a single upload on an object store."""
  p = path(p)
  data = data.encode("utf-8") if isinstance(data, str) else data
  if is_remote(p):
    p.write_bytes(data)
    return
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = p.parent / f"{p.name}.tmp.{os.getpid()}"
  tmp.write_bytes(data)
  os.replace(tmp, p)


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file between any two locations epath reaches (e.g. a local tokenizer into a gs:// run)."""
  write_atomic(dst, path(src).read_bytes())


class AppendFile:
  """A text file that grows line by line and is durable after every `flush`.

  Locally an ordinary file opened for append. Object stores cannot append: there the contents
  (existing object included) are kept in memory and the whole object is rewritten on `flush`,
  which callers do once per logging step, so each flush leaves a complete, valid file.
  """

  def __init__(self, p: PathLike):
    self.path = path(p)
    self.remote = is_remote(self.path)
    if self.remote:
      self._lines = [self.path.read_text()] if self.path.exists() else []
      self._dirty = False
      self._f = None
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._f = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with

  def write(self, text: str) -> None:
    if self.remote:
      self._lines.append(text)
      self._dirty = True
    else:
      self._f.write(text)

  def flush(self) -> None:
    if self.remote:
      if self._dirty:
        self.path.write_text("".join(self._lines))
        self._dirty = False
    else:
      self._f.flush()

  def close(self) -> None:
    self.flush()
    if self._f is not None:
      self._f.close()
      self._f = None
