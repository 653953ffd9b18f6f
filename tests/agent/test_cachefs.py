"""agent.cachefs: tree removal against a directory that gains a file while it is being removed."""

import os

from agent import cachefs


def test_remove_tree_sweeps_a_file_written_into_it_meanwhile(tmp_path, monkeypatch):
    d = tmp_path / "entry"
    d.mkdir()
    (d / "kv.safetensors").write_bytes(b"k" * 10)
    real_rmdir, late = os.rmdir, []

    def rmdir_after_a_late_write(path):
        if not late:  # a reader's manifest update lands after the listing
            late.append(path)
            (d / "manifest.json").write_text("{}")
        real_rmdir(path)

    monkeypatch.setattr(cachefs.os, "rmdir", rmdir_after_a_late_write)
    assert cachefs.remove_tree(d) == 12
    assert late and not d.exists()
