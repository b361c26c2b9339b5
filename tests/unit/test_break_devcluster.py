"""What a newcomer meets in `cohdi-agent dev-cluster`: the help says what each action needs (Go,
root, apt) and where its results go; building the image without root says what to do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent import errors
from agent.devcluster import image


def dev_cluster_help() -> str:
    done = subprocess.run(
        [sys.executable, "-m", "agent", "dev-cluster", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return " ".join(done.stdout.split())


def test_dev_cluster_help_says_what_build_and_image_need_and_where_they_go() -> None:
    text = dev_cluster_help()
    build = text[text.index("build build") : text.index(" up ")]
    assert "Go" in build, build
    image_line = text[text.index("image build") : text.index("positional arguments")]
    assert "root" in image_line, image_line
    assert "apt" in image_line, image_line
    assert "--dev-cache-dir" in text


def test_building_the_image_without_root_says_how(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(image, "source_key", lambda root: "k" * 16)  # no archive cached for it
    with pytest.raises(errors.DevClusterError) as caught:
        image.ensure_image(tmp_path / "cache", lambda line: None)
    message = str(caught.value)
    assert "as root" in message, message
    assert str(tmp_path / "cache") in message, message  # the cache to build into
