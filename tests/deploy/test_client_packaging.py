"""The browser client reaches every installation: `gateway/static/userstream.js` links to the
repository's `client/userstream.js` (gateway/client_script.py), so deploy/Dockerfile must copy
the link's target into the build context's same place for the wheel to carry its bytes."""

from pathlib import Path

from tests.deploy.sources import ROOT
from tests.deploy.test_image import DOCKERFILE, ignore_patterns, in_context, stages

LINK = ROOT / "gateway" / "static" / "userstream.js"


def links_in_packages() -> list[Path]:
    """Every symbolic link under the installed packages' folders."""
    return [
        p
        for package in ("core", "sync", "gateway")
        for p in (ROOT / package).rglob("*")
        if p.is_symlink()
    ]


def test_the_packaged_client_is_a_link_to_the_repository_client() -> None:
    assert LINK.is_symlink()
    assert LINK.resolve() == ROOT / "client" / "userstream.js"
    assert LINK.read_bytes() == (ROOT / "client" / "userstream.js").read_bytes()


def test_the_image_build_copies_what_every_link_points_to() -> None:
    builder = stages(DOCKERFILE.read_text())["builder"]
    copied = [s.rstrip("/") for kw, args in builder if kw == "COPY" for s in args.split()[:-1]]
    patterns = ignore_patterns()
    links = links_in_packages()
    assert LINK in links
    for link in links:
        target = link.resolve().relative_to(ROOT).as_posix()
        assert any(target == c or target.startswith(c + "/") for c in copied), target
        assert in_context(target, patterns), target
