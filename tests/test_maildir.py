"""Local Maildir delivery: exact bytes in new/, unique names, nothing outside the root."""
from __future__ import annotations

import os
import re

import pytest

from mta.delivery.maildir import deliver_to_maildir, delivery_headers, unique_name


def test_message_lands_in_new_with_lf_line_ends_and_the_delivery_headers(tmp_path):
    root = tmp_path / "mail"
    data = [b"Subject: a\r", b"\n\r\n", b".dot\r\nbody \xff\r\nlone\rCR\r\n"]
    path = deliver_to_maildir(str(root), "Alice", data, "gw.example.test",
                              delivery_headers("bob@example.test", "alice@example.test"))
    assert os.path.dirname(path) == str(root / "alice" / "new")
    with open(path, "rb") as f:
        assert f.read() == (b"Return-Path: <bob@example.test>\nDelivered-To: alice@example.test\n"
                            b"Subject: a\n\n.dot\nbody \xff\nlone\rCR\n")
    assert sorted(os.listdir(root / "alice")) == ["cur", "new", "tmp"]
    assert os.listdir(root / "alice" / "tmp") == []


def test_bytes_and_repeated_delivery_get_distinct_names(tmp_path):
    paths = {deliver_to_maildir(str(tmp_path), "bob", b"x\r\n", "h") for _ in range(20)}
    assert len(paths) == 20
    assert len(os.listdir(tmp_path / "bob" / "new")) == 20


def test_unique_name_follows_maildir_form():
    name = unique_name("gw/x:y")
    assert re.fullmatch(r"\d+\.M\d+P\d+Q\d+\.gw\\057x\\072y", name)


@pytest.mark.parametrize("bad", ["", ".", "..", ".hidden", "a/b", "../x", "a\0b"])
def test_unsafe_names_refused(tmp_path, bad):
    with pytest.raises(ValueError):
        deliver_to_maildir(str(tmp_path / "root"), bad, b"x\r\n", "h")
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "root").exists() or os.listdir(tmp_path / "root") == []
