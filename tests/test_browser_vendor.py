"""The browser peer's vendored bundle is the file its README describes, built from the
versions web/ pins, and the page loads nothing else from outside the package."""

from __future__ import annotations

import hashlib
import json
import re

from processes import ROOT

VENDOR = ROOT / "peer" / "browser" / "vendor"
WEB = ROOT / "web"


def test_the_bundle_has_the_checksum_its_readme_names():
    readme = (VENDOR / "README.md").read_text()
    named = re.search(r"sha256 of `noble\.js`: `([0-9a-f]{64})`", readme)
    assert named, "vendor/README.md must name the bundle's sha256"
    assert hashlib.sha256((VENDOR / "noble.js").read_bytes()).hexdigest() == named[1]


def test_the_readme_names_the_versions_the_lock_file_pins():
    readme = (VENDOR / "README.md").read_text()
    lock = json.loads((WEB / "package-lock.json").read_text())
    manifest = json.loads((WEB / "package.json").read_text())
    for package in ("@noble/curves", "@noble/hashes"):
        pinned = lock["packages"][f"node_modules/{package}"]["version"]
        assert manifest["dependencies"][package] == pinned  # exact, not a range
        assert re.search(rf"`{re.escape(package)}` \| {re.escape(pinned)} \| MIT", readme)
        assert lock["packages"][f"node_modules/{package}"]["integrity"].startswith("sha512-")


def test_the_licence_travels_with_the_bundle():
    licence = (VENDOR / "LICENSE.noble").read_text()
    assert "MIT License" in licence and "Paul Miller" in licence


def test_the_bundle_imports_nothing_and_has_no_eval():
    bundle = (VENDOR / "noble.js").read_text()
    assert not re.search(r"^\s*import\s", bundle, re.M)  # one self-contained module
    assert "eval(" not in bundle and "new Function" not in bundle
    assert re.search(r"^export \{", bundle, re.M)


def test_the_build_script_rebuilds_from_the_lock_file():
    script = (WEB / "build").read_text()
    assert "npm ci" in script  # the lock file's exact versions and integrity hashes
    assert "out=../peer/browser/vendor" in script and '--outfile="$out/noble.js"' in script
