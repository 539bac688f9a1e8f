"""Keep what a failed check needs to be explained: the mesh's output, its config, its data
folder and a readable dump of its stores, in one folder that the failure message names.

    MESH_EVIDENCE_DIR=/some/dir pytest ...       # where kept folders go
                                                # (default: mesh-evidence/ under the temp dir)
    MESH_LOG=DEBUG python3 scripts/bench/core.py --only kill   # more than the default INFO

Benchmarks, process-level tests and the stress harness run their meshes at INFO (set
MESH_LOG to change it): every start of an incarnation (which node, which number, what
state it read under its fence), every claim refused, every move and audit, every exit,
so that the lines of one name tell how its state went from one incarnation to the next.
Nothing is kept when every check passes.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

LOG_LEVEL = "INFO"


def root() -> Path:
    """Where kept folders go: $MESH_EVIDENCE_DIR, or mesh-evidence/ in the system temp dir."""
    return Path(os.environ.get("MESH_EVIDENCE_DIR") or Path(tempfile.gettempdir()) / "mesh-evidence")


def new_folder(label: str) -> Path:
    """A fresh folder under root() for one failure; its name says what and when."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:80] or "mesh"
    base = root()
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{safe}-{stamp}-", dir=base))


def keep(dest: Path, lines: Iterable[str], config: str | os.PathLike | None, why: str = "",
         extra: dict[str, str] | None = None) -> Path:
    """Write the mesh's output, copy its config and data folder, and dump its stores into
    `dest` (made if missing). Best effort: a part that cannot be kept is noted, not raised."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    notes = [why] if why else []
    (dest / "output.log").write_text("\n".join(lines) + "\n")
    for name, text in (extra or {}).items():
        (dest / name).write_text(text)
    data_dir = None
    if config is not None:
        try:
            shutil.copy2(config, dest / Path(config).name)
            data_dir = _data_dir(config)
        except Exception as exc:  # a config that never loaded says so in output.log
            notes.append(f"config {config}: {type(exc).__name__}: {exc}")
    if data_dir is not None and os.path.isdir(data_dir):
        try:
            shutil.copytree(data_dir, dest / "data", symlinks=True, ignore_dangling_symlinks=True)
        except Exception as exc:
            notes.append(f"copying {data_dir}: {type(exc).__name__}: {exc}")
        try:
            (dest / "stores.txt").write_text(dump_stores(str(dest / "data" if (dest / "data").exists() else data_dir)))
        except Exception as exc:
            notes.append(f"dumping the stores: {type(exc).__name__}: {exc}")
    if notes:
        (dest / "README.txt").write_text("\n".join(notes) + "\n")
    return dest


def _data_dir(config) -> str:
    from mesh import config as mesh_config
    return mesh_config.load(str(config)).data_dir


def dump_stores(data_dir: str) -> str:
    """Every store under `data_dir` as text: each record (incarnation, seq, vsn, state), each
    fence, and the supervisor's records (placements, epoch). Read-only; the mesh must be stopped."""
    import lmdb
    import msgpack
    out = []
    for mdb in sorted(Path(data_dir).rglob("data.mdb")):
        out.append(f"== {mdb.parent.relative_to(data_dir)}")
        env = lmdb.open(str(mdb.parent), readonly=True, lock=False, max_dbs=5, subdir=True)
        try:
            for db_name in (b"agents", b"fences", b"meta"):
                try:
                    db = env.open_db(db_name, create=False)
                except lmdb.Error:
                    continue
                with env.begin(db=db) as txn:
                    for key, value in txn.cursor():
                        try:
                            shown = msgpack.unpackb(value, raw=False)
                            if db_name == b"agents" and isinstance(shown, list) and len(shown) in (4, 5):
                                fmt, inc, seq, state, *vsn = shown  # format 3 adds the kind's code version
                                shown = (f"incarnation {inc} seq {seq} vsn {vsn[0] if vsn else 1} "
                                         f"state {msgpack.unpackb(state, raw=False)!r}")
                        except Exception:
                            shown = bytes(value)[:80]
                        out.append(f"{db_name.decode()} {bytes(key).decode(errors='replace')}: {shown}")
        finally:
            env.close()
    return "\n".join(out) + "\n"


def note(exc: BaseException, where: Path) -> None:
    """Say in an exception's message where its evidence is (shown by tracebacks and by
    describe())."""
    text = f"evidence kept in {where}"
    if text not in getattr(exc, "__notes__", ()):
        exc.add_note(text)


def describe(exc: BaseException) -> str:
    """One line for an error: type, message and where its evidence is kept."""
    notes = "; ".join(getattr(exc, "__notes__", ()))
    return f"{type(exc).__name__}: {exc}" + (f" ({notes})" if notes else "")
