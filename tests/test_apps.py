"""Applications of apps/: the recipe's checks and the assembly's refusals, then WordPress for real:
`invoke serve php-7.4.33 --app wordpress` from an empty state directory, driven by an HTTP client."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from pathlib import Path

import pytest
import requests
from conftest import ROOT
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_serve import session_env

from wasmforge.apps import App, _copy_resolved, _unzip, load_app
from wasmforge.errors import RecipeError, SourceError, WasmforgeError

APPS = ROOT / "apps"


def test_the_wordpress_recipe_loads():
    app = load_app(APPS, "wordpress")
    assert app.version == "6.8.12" and app.site["writable"] == ["wp-content/uploads"]
    assert {p["package"] for p in app.spec["debian"]["packages"]} >= {"wordpress", "php-getid3"}


def test_an_unknown_application_names_the_known_ones():
    with pytest.raises(WasmforgeError, match="no application named 'drupal'") as info:
        load_app(APPS, "drupal")
    assert "wordpress" in info.value.render()


@pytest.mark.parametrize("change", [
    ("from: usr/share/wordpress", "from: ../../etc"),
    ("writable: [wp-content/uploads]", "writable: [/var/www]"),
    ("to: wp-content/db.php", "to: wp-content/../../db.php"),
    ("post: /wp-admin/install.php?step=2", "post: wp-admin/install.php"),
])
def test_a_recipe_with_a_path_out_of_the_site_is_refused(tmp_path, change):
    text = (APPS / "wordpress.yaml").read_text()
    assert change[0] in text
    (tmp_path / "wordpress.yaml").write_text(text.replace(change[0], change[1]))
    with pytest.raises(RecipeError) as info:
        load_app(tmp_path, "wordpress")
    assert str(tmp_path / "wordpress.yaml") in info.value.render()


def _zip(path: Path, members: dict[str, bytes], links: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (0o120777 << 16)
            z.writestr(info, data)
    return path


def _app(tmp_path: Path) -> App:
    return App("x", "1", tmp_path / "x.yaml", {})


@pytest.mark.parametrize(("members", "links"), [
    ({"top/../../evil.php": b"x"}, ()),
    ({"top//etc/passwd": b"x", "/top/a": b"x"}, ()),
    ({"top/link": b"/etc/passwd"}, ("top/link",)),
    ({"other/a.php": b"x"}, ()),
])
def test_a_zip_with_a_path_out_a_link_or_another_top_is_refused(tmp_path, members, links):
    archive = _zip(tmp_path / "a.zip", members, links)
    import hashlib

    with pytest.raises(SourceError):
        _unzip(archive, hashlib.sha256(archive.read_bytes()).hexdigest(), "top", tmp_path / "out", _app(tmp_path))
    assert not (tmp_path / "evil.php").exists()


def test_a_zip_that_is_not_the_pinned_one_is_refused(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"top/a.php": b"x"})
    with pytest.raises(SourceError, match="does not match the sha256"):
        _unzip(archive, "0" * 64, "top", tmp_path / "out", _app(tmp_path))
    assert not (tmp_path / "out").exists()


def test_links_are_replaced_by_their_files_and_links_out_of_the_packages_refused(tmp_path):
    root = tmp_path / "packages"
    (root / "usr/share/lib").mkdir(parents=True)
    (root / "usr/share/lib/real.js").write_text("js")
    site = root / "usr/share/site"
    site.mkdir()
    (site / "a.js").symlink_to("../lib/real.js")
    (site / "abs.js").symlink_to("/usr/share/lib/real.js")  # absolute: read inside the packages
    _copy_resolved(root, site, tmp_path / "out", set())
    assert (tmp_path / "out/a.js").read_text() == "js" and not (tmp_path / "out/a.js").is_symlink()
    assert (tmp_path / "out/abs.js").read_text() == "js"
    (tmp_path / "secret").write_text("host file")
    (site / "escape.js").symlink_to("../../../../secret")
    with pytest.raises(SourceError, match="escape.js links to"):
        _copy_resolved(root, site, tmp_path / "out2", set())
    _copy_resolved(root, site, tmp_path / "out3", {"escape.js"})
    assert not (tmp_path / "out3/escape.js").exists()


def _png(width: int, height: int) -> bytes:
    rows = b"".join(b"\0" + b"".join(bytes([(x * 3) % 256, (y * 5) % 256, 90]) for x in range(width))
                    for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


@pytest.mark.integration
def test_wordpress_installs_serves_a_post_a_comment_and_an_upload(php, browser, tmp_path):
    state = tmp_path / "state"
    server = subprocess.Popen([sys.executable, "-m", "invoke", "serve", "php-7.4.33", "--app", "wordpress",
                               "--state", str(state), "--port", "0"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                              env=session_env(php[0]))
    log: list[str] = []
    installed = threading.Event()

    def read_log() -> None:  # always drained: a full pipe would stop the server
        assert server.stderr is not None
        for line in server.stderr:
            log.append(line)
            if "wordpress installed:" in line or line.startswith("error:"):
                installed.set()
        installed.set()

    threading.Thread(target=read_log, daemon=True).start()
    try:
        installed.wait(timeout=600)
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)/", "".join(log))
        url = found.group(1) if found else None
        text = "".join(log)
        assert url and "wordpress installed:" in text, text[-3000:]
        password = (state / "admin-password").read_text().strip()
        assert (state / "admin-password").stat().st_mode & 0o077 == 0

        front = requests.get(url + "/", timeout=60)
        assert front.status_code == 200 and "A WordPress on WebAssembly" in front.text and "Hello world!" in front.text

        admin = requests.Session()
        admin.get(url + "/wp-login.php", timeout=60)
        login = admin.post(url + "/wp-login.php", data={"log": "admin", "pwd": password, "wp-submit": "Log In",
                                                        "testcookie": "1", "redirect_to": url + "/wp-admin/"},
                           allow_redirects=False, timeout=60)
        assert login.status_code == 302 and login.headers["Location"] == url + "/wp-admin/"
        assert "Dashboard" in admin.get(url + "/wp-admin/", timeout=60).text
        nonce = admin.get(url + "/wp-admin/admin-ajax.php", params={"action": "rest-nonce"}, timeout=60).text.strip()

        made = admin.post(url + "/?rest_route=/wp/v2/posts", headers={"X-WP-Nonce": nonce}, timeout=60,
                          json={"title": "Served from php-cgi.wasm", "content": "<p>Made through the REST API.</p>",
                                "status": "publish"})
        assert made.status_code == 201, made.text[:500]
        post = made.json()
        assert "Served from php-cgi.wasm" in requests.get(url + "/", timeout=60).text
        page = requests.get(post["link"], timeout=60)
        assert page.status_code == 200 and "Made through the REST API." in page.text

        comment = admin.post(url + "/wp-comments-post.php", allow_redirects=False, timeout=60,
                             data={"comment_post_ID": post["id"], "comment": "A comment from the test."})
        assert comment.status_code == 302 and "#comment-" in comment.headers["Location"]
        assert "A comment from the test." in requests.get(post["link"], timeout=60).text

        upload = admin.post(url + "/?rest_route=/wp/v2/media", data=_png(400, 300), timeout=60,
                            headers={"X-WP-Nonce": nonce, "Content-Type": "image/png",
                                     "Content-Disposition": 'attachment; filename="gradient.png"'})
        assert upload.status_code == 201, upload.text[:500]
        media = upload.json()
        # gd made the smaller sizes; the file is in the writable uploads directory and served as a file.
        assert {"thumbnail", "medium"} <= set(media["media_details"]["sizes"])
        image = requests.get(media["source_url"], timeout=60)
        assert image.status_code == 200 and image.headers["Content-Type"] == "image/png"
        assert image.content == _png(400, 300)
        assert list((state / "site" / "wp-content" / "uploads").rglob("gradient-150x150.png"))
        assert (state / "database" / "wordpress.sqlite").is_file()

        # In a real browser: the front page as rendered, then wp-admin after logging in through its form.
        browser.delete_all_cookies()
        browser.get(url + "/")
        assert browser.title == "A WordPress on WebAssembly"
        titles = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".wp-block-post-title")]
        assert titles[:2] == ["Served from php-cgi.wasm", "Hello world!"]
        assert browser.save_screenshot(str(tmp_path / "wordpress-front.png"))
        browser.get(url + "/wp-login.php")
        browser.find_element(By.ID, "user_login").send_keys("admin")
        browser.find_element(By.ID, "user_pass").send_keys(password)
        browser.find_element(By.ID, "wp-submit").click()
        WebDriverWait(browser, 60).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#wpbody h1"))
        assert browser.current_url == url + "/wp-admin/"
        assert browser.find_element(By.CSS_SELECTOR, "#wpbody h1").text == "Dashboard"
        assert browser.save_screenshot(str(tmp_path / "wordpress-dashboard.png"))
        assert (tmp_path / "wordpress-dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
