"""A directory laid out like the mounted tree: the clients against it, no daemon."""

from __future__ import annotations

from cmad.clients.client import Client

M = 1 << 20


def fake_mount(root, regions=(("video", 0x40000000, 4 * M),), *, chunkinfo="\n",
               monkeypatch=None, **region_files):
    """A directory laid out like the mount: regions (name, start, size) with
    their attributes, a ``chunkinfo``, a ``free`` file that records writes.
    ``region_files`` maps a file name to {region name: content}."""
    root.mkdir(exist_ok=True)
    (root / "allocators").write_text("bf buddy bitmap\n")
    (root / "chunkinfo").write_text(chunkinfo)
    (root / "free").write_text("")
    (root / "chunks").mkdir()
    (root / "ids").mkdir()
    for name, start, size in regions:
        d = root / "regions" / f"{start:016x}"
        d.mkdir(parents=True)
        for attr, value in (("name", name), ("start", f"{start:016x}"), ("size", size),
                            ("free", size), ("users", 0), ("alloc", "bf"),
                            ("kind", "exclusive"), ("bitmap", "." * (size // 4096)),
                            ("stats", "alloc_ok 0\nfragmentation 0.0\nlargest_free 0")):
            (d / attr).write_text(f"{value}\n")
        for attr, per_region in region_files.items():
            if name in per_region:
                (d / attr).write_text(per_region[name])
        (root / "regions" / name).symlink_to(f"{start:016x}")
    if monkeypatch is not None:
        monkeypatch.setattr(Client, "check", lambda self: None)
    return root


def fake_chunk(root, ident: int, start: int, *, arena=None, offset=0, size=4096) -> None:
    """``ids/<ident>/`` with start and mmap (into ``arena``)."""
    d = root / "ids" / str(ident)
    d.mkdir(exist_ok=True)
    (d / "start").write_text(f"{start:016x}\n")
    if arena is not None:
        (d / "mmap").write_text(f"{arena} {offset} {size}\n")
