"""Your own images: ``train/<class>/*`` and ``test/<class>/*`` (PNG or JPEG).

``data.path`` is a folder or a ``.tar.gz``/``.tgz``/``.tar`` with that layout (optionally
inside one top-level folder). Class names are the folder names of ``train/``, sorted;
label i is the i-th name. Archives are read member by member straight into memory (never
extracted). Images are converted to RGB; any other size is resized to 32x32 (noted in the log).
Only regular files are read. Symbolic links inside a folder are refused: DVC hashes a link,
not its target, so a change behind one would go unnoticed. Names with newlines or control
characters are refused, as they would forge lines in logs and reports.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from stages.errors import UserError
from stages.sources.images import decode_image
from stages.sources.raw import RawData
from stages.sources.safety import iter_tar, read_regular_file

log = logging.getLogger("convflow.ingest")

EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
ARCHIVES = (".tar.gz", ".tgz", ".tar")

#: split -> class -> [(name, encoded bytes)], plus every class folder seen (even if empty)
_Files = dict[str, dict[str, list[tuple[str, bytes]]]]


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") for part in parts)


def _check_name(parts: tuple[str, ...], origin: str) -> None:
    for part in parts:
        if not part.isprintable():
            raise UserError(f"{origin}: {'/'.join(parts)!r} has a newline or control character "
                            "in its name; rename it")


def _collect(entries: list[tuple[tuple[str, ...], bytes | None]], origin: str) -> _Files:
    """Group (path parts, bytes or None for a folder) into split/class/file."""
    tops = {parts[0] for parts, _ in entries if parts}
    prefix: tuple[str, ...] = ()
    if "train" not in tops and len(tops) == 1 and any(
            parts[1:2] == ("train",) for parts, _ in entries):
        prefix = (next(iter(tops)),)  # the layout inside one top-level folder
    files: _Files = {s: defaultdict(list) for s in SPLITS}
    ignored = 0
    for parts, data in entries:
        if parts[:len(prefix)] != prefix:
            continue
        rel = parts[len(prefix):]
        if not rel or rel[0] not in SPLITS or _hidden(rel):
            continue
        _check_name(rel[:3], origin)
        if len(rel) == 2 and data is None:
            files[rel[0]][rel[1]]  # noqa: B018 - registers a (maybe empty) class folder
        elif len(rel) == 3 and data is not None and rel[2].lower().endswith(EXTENSIONS):
            files[rel[0]][rel[1]].append((rel[2], data))
        elif data is not None or len(rel) > 3:
            ignored += 1
    if ignored:
        log.warning("%s: ignored %d file(s) that are not train|test/<class>/<image>.png|jpg",
                    origin, ignored)
    for split in SPLITS:
        if not files[split]:
            raise UserError(f"{origin}: no {'/'.join(prefix + (split,))}/<class>/ folders; "
                            "expected train/<class>/*.png|jpg and test/<class>/*.png|jpg")
        for cls, items in files[split].items():
            if not items:
                raise UserError(f"{origin}: class folder {'/'.join(prefix + (split, cls))} "
                                "has no PNG/JPEG images; add some or remove the folder")
    return files


def _refuse_link(path: Path, parts: tuple[str, ...], root: Path) -> None:
    _check_name(parts, str(root))  # before the name is shown
    if path.is_symlink():
        # DVC hashes the link itself, not what it points at: an image changed behind it
        # would leave `dvc status` clean and the pipeline would not re-run
        raise UserError(f"{path}: a symbolic link (to {os.readlink(path)!r}); DVC would not see a "
                        "change behind it. Copy the folder in, or point data.path at the real "
                        "folder")


def _read_folder(root: Path) -> list[tuple[tuple[str, ...], bytes | None]]:
    entries: list[tuple[tuple[str, ...], bytes | None]] = []
    # links are refused, not followed (the walk never descends through one), and the walk
    # stops at the depth an image can be at
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in dirnames:
            _refuse_link(Path(dirpath) / d, (*rel, d), root)
            entries.append(((*rel, d), None))
        if len(rel) >= 3:
            dirnames.clear()
        # only files that can be images at the right depth are read, regular files only
        for f in sorted(f for f in filenames if not f.startswith(".")):
            parts, path = (*rel, f), Path(dirpath) / f
            _refuse_link(path, parts, root)
            is_image = len(parts) in (3, 4) and f.lower().endswith(EXTENSIONS)
            entries.append((parts, read_regular_file(path) if is_image else b""))
    return entries


def _read_archive(archive: Path) -> list[tuple[tuple[str, ...], bytes | None]]:
    def want(member) -> bool:  # noqa: ANN001
        return member.name.lower().endswith(EXTENSIONS)

    entries: list[tuple[tuple[str, ...], bytes | None]] = []
    for member, data in iter_tar(archive, want):
        parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
        if parts:
            entries.append((parts, None if member.isdir() else (data or b"")))
    return entries


def decode_images(items: list[tuple[str, bytes]], where: str,
                  sizes: Counter[str] | None = None) -> tuple[np.ndarray, int]:
    """Decode PNG/JPEG bytes to uint8 N x 3 x 32 x 32 RGB; returns (images, number resized).

    ``sizes``, if given, counts the sizes seen (``"WxH"``) for the data report.
    """
    out = np.empty((len(items), 3, 32, 32), np.uint8)
    resized = 0
    for i, (name, data) in enumerate(items):
        out[i], original = decode_image(data, f"{where}/{name}")
        resized += original != (32, 32)
        if sizes is not None:
            sizes[f"{original[0]}x{original[1]}"] += 1
    return out, resized


def load_imagefolder(path: str | None) -> RawData:
    """Both splits from a folder or tar archive of ``train|test/<class>/<image>``."""
    root = Path(path or "").expanduser()
    if not path or not root.exists():
        raise UserError(f"data.path: {root} does not exist; set it to a folder or .tar.gz "
                        "with train/<class>/* and test/<class>/*")
    if root.is_dir():
        entries = _read_folder(root)
    elif root.name.lower().endswith(ARCHIVES):
        if not stat.S_ISREG(root.stat().st_mode):  # a FIFO would hang tarfile
            raise UserError(f"data.path: {root} is not a regular file")
        entries = _read_archive(root)
    else:
        raise UserError(f"data.path: {root} is neither a folder nor a .tar.gz/.tgz/.tar archive")
    files = _collect(entries, str(root))
    classes = tuple(sorted(files["train"]))
    unknown = sorted(set(files["test"]) - set(classes))
    if unknown:
        raise UserError(f"{root}: test/ has class folder(s) {', '.join(unknown)} that train/ "
                        f"lacks; train classes are {', '.join(classes)}")
    split_arrays = {}
    total_resized = 0
    sizes: Counter[str] = Counter()
    for split in SPLITS:
        images, labels = [], []
        for label, cls in enumerate(classes):
            items = sorted(files[split].get(cls, []))
            arr, resized = decode_images(items, f"{root}/{split}/{cls}", sizes)
            total_resized += resized
            images.append(arr)
            labels.append(np.full(len(arr), label, np.int64))
        split_arrays[split] = (np.concatenate(images), np.concatenate(labels))
    if total_resized:
        log.info("%s: resized %d image(s) of another size to 32x32", root, total_resized)
    (x_train, y_train), (x_test, y_test) = split_arrays["train"], split_arrays["test"]
    return RawData(x_train, y_train, x_test, y_test, classes, source="imagefolder",
                   details={"path": root.name, "resized": total_resized,
                            "sizes": dict(sizes)})
